"""Device, dtype and weights for a causal LM: plain Hugging Face directories (or hub ids)
through transformers, GPTQ checkpoints through gptqmodel's kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from worker.gptq import gptq_dtype, is_gptq_dir, load_gptq


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    dtype: torch.dtype
    kernel: str  # "dense" or the GPTQ backend that loaded it


def load_causal_lm(
    path: str,
    device: torch.device,
    dtype: str = "auto",
    *,
    attn_implementation: str | None = None,
    gptq_backend: str = "auto",
) -> LoadedModel:
    """Load `path` for inference on `device`, in eval mode."""
    hf_logging.disable_progress_bar()
    if is_gptq_dir(path):
        torch_dtype = gptq_dtype(dtype, device)
        model, kernel = load_gptq(path, device, torch_dtype, gptq_backend)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
    else:
        torch_dtype, kernel = pick_dtype(dtype, device), "dense"
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra).to(device)
    model.eval()
    return LoadedModel(model, torch_dtype, kernel)
