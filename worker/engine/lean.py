"""A lean forward for Llama-family decoders on CPU: the transformers model's own weights, run
as a few big matmuls and the C kernels (native.py) instead of ~40 small torch ops per layer.

Per layer: one fused q/k/v projection, rotary in place, K/V written to the paged cache, paged
attention, o_proj; RMSNorm fused with the residual add; one fused gate/up projection and
SiLU(gate) * up (GPTQ layers fuse as gptq_dispatch.FusedDispatch). Dense weights are fused and
prepacked in oneDNN's layout once, at load, and become the only copy
(the modules' own weights are released; a tied embedding keeps its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine import native
from worker.engine.attention import PagedKV
from worker.engine.gptq_dispatch import FusedDispatch

MODEL_TYPES = ("llama", "mistral", "qwen2")
PACK_ROWS = 128  # oneDNN's row-count hint for prepacked weights (any count runs)


def _fused_bias(linears: list[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    """The biases of linears side by side (zeros for those without); None when none has one."""
    if all(m.bias is None for m in linears):
        return None
    return torch.cat(
        [
            torch.zeros(m.out_features, dtype=dtype) if m.bias is None else m.bias.data
            for m in linears
        ]
    )


def _fuse(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) for dense linears side by side; None when any of them is not a
    plain nn.Linear (a GPTQ layer)."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    weight = torch.cat([m.weight.data for m in linears])
    return weight, _fused_bias(linears, weight.dtype)


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in oneDNN's blocked layout for its linear; None where oneDNN cannot take this
    dtype on this CPU (bf16 without AVX-512 or AVX-NE-CONVERT, for one)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    except RuntimeError:
        return None


class _Projection:
    """Several projections of one input as one [T, sum of outputs] tensor. Dense ones are
    fused into one weight, prepacked in oneDNN's blocked layout where oneDNN is present (15-40 %
    faster than F.linear in fp32 on CPU, 5-40 % in bf16: no per-call weight packing), and the
    modules' own weights are then released (`keep`: a weight still used elsewhere, the tied
    embedding); GPTQ ones run as one `FusedDispatch` where they can, else their own modules.

    Half-precision weights oneDNN cannot pack on this CPU (bf16 on AVX2: torch's bf16 matmul
    there runs 6-370x slower than fp32) are widened to fp32 once (exact) and packed: the matmul
    runs in fp32 and its result is rounded back to the activations' dtype, as a half-precision
    matmul with fp32 accumulation would, at twice the weights' memory."""

    def __init__(self, linears: list[nn.Module], keep: bool = False):
        self.linears = linears
        self.weight, self.bias = _fuse(linears) or (None, None)
        self.compute: torch.dtype | None = None  # the matmul's dtype when packed
        self.gptq = None
        if FusedDispatch.fusable(linears):
            self.gptq = FusedDispatch(linears, _fused_bias(linears, torch.bfloat16))
        if self.weight is None:
            return
        packed = _prepack(self.weight)
        if packed is None and self.weight.dtype in (torch.bfloat16, torch.float16):
            packed = _prepack(self.weight.float())
            self.bias = None if self.bias is None else self.bias.float()
        if packed is not None:
            self.weight, self.compute = packed, packed.dtype
            if not keep:
                for m in linears:
                    m.weight.data = torch.empty(0, dtype=m.weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gptq is not None:
            return self.gptq(x)
        if self.weight is None:
            return torch.cat([m(x) for m in self.linears], dim=-1)
        if self.compute is None:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(
            x.to(self.compute), self.weight, self.bias, "none", [], ""
        )
        return y.to(x.dtype)


class LeanLlama:
    """Runs a transformers Llama-family causal LM's decoder stack over a packed step."""

    def __init__(self, model: nn.Module):
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        head = model.get_output_embeddings()
        tied = type(head) is nn.Linear and head.weight.data_ptr() == self.embed.weight.data_ptr()
        self.head = _Projection([head], keep=tied)
        self.vocab = head.out_features
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm,
                    _Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                    _Projection([attn.o_proj]),
                    layer.post_attention_layernorm,
                    _Projection([mlp.gate_proj, mlp.up_proj]),
                    _Projection([mlp.down_proj]),
                    attn.scaling,
                )
            )

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Llama-family layers with SiLU MLPs and RMSNorms this forward knows."""
        cfg = model.config
        inner = getattr(model, "model", None)
        if cfg.model_type not in MODEL_TYPES or inner is None:
            return False
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "sliding_window", None):
            return False
        return all(
            hasattr(layer, "self_attn") and hasattr(layer.mlp, "gate_proj")
            for layer in inner.layers
        )

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        kv: PagedKV,
        write_rows: torch.Tensor,
        tokens: native.TokenTables,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [len(last), vocab] at the packed rows `last`; ids, positions [T]."""
        h = self.embed(ids)
        cos, sin = self.rotary(h, positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        dim = cos.shape[-1]
        nq, nk = self.heads * dim, self.kv_heads * dim
        write = write_rows.flatten()
        residual, delta = h, None
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up, down, scale) in enumerate(self.layers):
            x = native.add_rmsnorm(delta, residual, norm1.weight, norm1.variance_epsilon)
            qkv = qkv_proj(x)
            native.rotary(qkv, self.heads + self.kv_heads, cos, sin)  # q and k heads
            k_cache, v_cache = kv.k[i], kv.v[i]
            native.kv_write(qkv, (nq, nq + nk), write, k_cache, v_cache)
            q = qkv[:, :nq].view(-1, self.heads, dim)
            attn = native.paged_attention(q, k_cache, v_cache, tokens, kv.block_size, scale)
            delta = o_proj(attn.view(-1, nq))
            x = native.add_rmsnorm(delta, residual, norm2.weight, norm2.variance_epsilon)
            delta = down(native.silu_mul(gate_up(x)))
        if not len(last):  # only chunks before their prompts' last: nothing is sampled
            return h.new_empty(0, self.vocab)
        final = native.add_rmsnorm(delta, residual, self.norm.weight, self.norm.variance_epsilon)
        return self.head(final[last])
