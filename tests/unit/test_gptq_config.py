"""Reading GPTQ quantize configs as gptqmodel does: per-layer `dynamic` overrides, the bit
widths a checkpoint holds (which pick the CPU kernels to try) and its packed format."""

from __future__ import annotations

import torch

from worker.engine.loading import (
    CPU_BACKENDS,
    CUDA_BACKENDS,
    checkpoint_format,
    dynamic_override,
    kernel_order,
    layer_bits,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_dynamic_override_first_match_literal_regex_and_negative() -> None:
    dynamic = {
        "lm_head": {"bits": 8, "group_size": 32},
        r"-:.*\.mlp\.down_proj": {},
        r"+:model\.layers\.1\..*": {"bits": 8},
        r"model\.layers\.\d+\.self_attn\..*": {"group_size": 64},
    }
    assert dynamic_override(dynamic, "lm_head") == {"bits": 8, "group_size": 32}
    assert dynamic_override(dynamic, "lm_head2") is None  # a literal names one module
    assert dynamic_override(dynamic, "model.layers.1.mlp.down_proj") is None  # "-:" first
    assert dynamic_override(dynamic, "model.layers.1.self_attn.q_proj") == {"bits": 8}
    assert dynamic_override(dynamic, "model.layers.0.self_attn.q_proj") == {"group_size": 64}
    assert dynamic_override(dynamic, "model.layers.0.mlp.up_proj") is None
    assert dynamic_override(None, "lm_head") is None


def test_layer_bits_and_cpu_kernel_order() -> None:
    plain = {"bits": 4, "group_size": 32}
    head8 = {**plain, "dynamic": {"lm_head": {"bits": 8}, "-:model.embed": {}}}
    assert layer_bits(plain) == {4} and layer_bits(head8) == {4, 8}
    assert kernel_order(CPU, "auto", layer_bits(plain)) == CPU_BACKENDS
    # the int4 kernels (aten, fused) take 4-bit layers only: the eager kernel for the rest
    assert kernel_order(CPU, "auto", layer_bits(head8)) == ("gptq_torch",)
    assert kernel_order(CPU, "auto", {8}) == ("gptq_torch",)
    assert kernel_order(CUDA, "auto", {8}) == CUDA_BACKENDS
    assert kernel_order(CPU, "gptq_torch_fused", {8}) == ("gptq_torch_fused",)


def test_checkpoint_format() -> None:
    assert checkpoint_format({"bits": 4}) == "gptq"  # AutoGPTQ's configs name none
    assert checkpoint_format({"format": "gptq_v2"}) == "gptq_v2"
    assert checkpoint_format({"checkpoint_format": "Marlin", "format": "gptq"}) == "marlin"
