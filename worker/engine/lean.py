"""A lean forward for Llama-family decoders on CPU: the transformers model's own weights, run
as a few big matmuls and the C kernels (native.py) instead of ~40 small torch ops per layer.

Per layer: one fused q/k/v projection (dense models; GPTQ layers keep their own modules and
are concatenated), rotary in place, K/V written to the paged cache, paged attention, o_proj;
RMSNorm fused with the residual add; one fused gate/up projection and SiLU(gate) * up. The
fused weights are the only copy: the original projections become views into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine import native
from worker.engine.attention import PagedKV

MODEL_TYPES = ("llama", "mistral", "qwen2")


def _fuse(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) for dense linears side by side; their weights become views of it.
    None when any of them is not a plain nn.Linear (a GPTQ layer)."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    weight = torch.cat([m.weight.data for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        zeros = [torch.zeros(m.out_features, dtype=weight.dtype) for m in linears]
        bias = torch.cat(
            [z if m.bias is None else m.bias.data for m, z in zip(linears, zeros, strict=True)]
        )
    start = 0
    for m in linears:
        m.weight.data = weight[start : start + m.out_features]
        if m.bias is not None and bias is not None:
            m.bias.data = bias[start : start + m.out_features]
        start += m.out_features
    return weight, bias


class _Projection:
    """Several projections of one input as one [T, sum of outputs] tensor."""

    def __init__(self, linears: list[nn.Module]):
        self.linears = linears
        self.fused = _fuse(linears)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return F.linear(x, *self.fused)
        return torch.cat([m(x) for m in self.linears], dim=-1)


class LeanLlama:
    """Runs a transformers Llama-family causal LM's decoder stack over a packed step."""

    def __init__(self, model: nn.Module):
        self.model = model
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.head = model.get_output_embeddings()
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm,
                    _Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                    attn.o_proj,
                    layer.post_attention_layernorm,
                    _Projection([mlp.gate_proj, mlp.up_proj]),
                    mlp.down_proj,
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
            for cache, at in ((k_cache, nq), (v_cache, nq + nk)):
                new = qkv[:, at : at + nk].reshape(-1, self.kv_heads, dim).transpose(0, 1)
                cache.view(-1, dim).index_copy_(0, write, new.reshape(-1, dim))
            q = qkv[:, :nq].view(-1, self.heads, dim)
            attn = native.paged_attention(q, k_cache, v_cache, tokens, kv.block_size, scale)
            delta = o_proj(attn.view(-1, nq))
            x = native.add_rmsnorm(delta, residual, norm2.weight, norm2.variance_epsilon)
            delta = down(native.silu_mul(gate_up(x)))
        final = native.add_rmsnorm(delta, residual, self.norm.weight, self.norm.variance_epsilon)
        return self.head(final[last])
