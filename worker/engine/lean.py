"""A lean forward for Llama-family decoders on CPU: the transformers model's own weights, run
as a few big matmuls and the C kernels (native.py) instead of ~40 small torch ops per layer.

Per layer: one fused q/k/v projection, rotary in place, K/V written to the paged cache, paged
attention, o_proj; RMSNorm fused with the residual add; one fused gate/up projection and
SiLU(gate) * up (GPTQ layers fuse as gptq_dispatch.FusedDispatch). The variants it knows:
q/k norms (Qwen3, Gemma 3; run by the model's own norm modules), `1 + w` RMSNorms, GeLU
MLPs, norms after attention and MLP as well as before (Gemma 3), sliding-window layers with
their own rotary (Gemma 3, Mistral) and final logit soft-capping. Dense weights are fused and
prepacked in oneDNN's layout once, at load, and become the only copy
(the modules' own weights are released; a tied embedding keeps its own).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine import native
from worker.engine.attention import PagedKV
from worker.engine.gptq_dispatch import FusedDispatch

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")
ONE_PLUS_W = ("gemma", "gemma3_text")  # their RMSNorms scale by 1 + weight
WINDOW_FROM_CONFIG = ("mistral",)  # every layer windowed by config.sliding_window
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


Norm = tuple[torch.Tensor, float]  # an RMSNorm as the C kernel takes it: weight, epsilon


def _norm(module: nn.Module, one_plus: bool) -> Norm:
    eps = getattr(module, "variance_epsilon", None) or module.eps
    return (module.weight.data + 1 if one_plus else module.weight.data), float(eps)


@dataclass
class _Layer:
    norm1: Norm  # before attention
    qkv: _Projection
    q_norm: nn.Module | None  # per-head norms of q and k, before rotary
    k_norm: nn.Module | None
    o: _Projection
    post_attn: Norm | None  # on the attention output, before the residual add
    norm2: Norm  # before the MLP
    gate_up: _Projection
    act: nn.Module | None  # None: SiLU, fused in C
    down: _Projection
    post_mlp: Norm | None  # on the MLP output, before the residual add
    scale: float
    window: int | None  # sliding window of this layer's attention
    rope: str | None  # its rotary embedding's layer type (Gemma 3: local or global)


class LeanLlama:
    """Runs a transformers Llama-family causal LM's decoder stack over a packed step."""

    def __init__(self, model: nn.Module):
        inner, cfg = model.model, model.config
        one_plus = cfg.model_type in ONE_PLUS_W
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        self.norm = _norm(inner.norm, one_plus)
        self.typed_rope = "layer_type" in inspect.signature(self.rotary.forward).parameters
        head = model.get_output_embeddings()
        tied = type(head) is nn.Linear and head.weight.data_ptr() == self.embed.weight.data_ptr()
        self.head = _Projection([head], keep=tied)
        self.vocab = head.out_features
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layers = [self._layer(layer, cfg, one_plus) for layer in inner.layers]

    def _layer(self, layer: nn.Module, cfg, one_plus: bool) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        sandwich = hasattr(layer, "pre_feedforward_layernorm")  # norms after, too (Gemma 3)
        if cfg.model_type in WINDOW_FROM_CONFIG:
            window = getattr(cfg, "sliding_window", None)
        else:
            window = getattr(attn, "sliding_window", None)
        act = None if _is_silu(mlp.act_fn) else mlp.act_fn
        return _Layer(
            norm1=_norm(layer.input_layernorm, one_plus),
            qkv=_Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            o=_Projection([attn.o_proj]),
            post_attn=_norm(layer.post_attention_layernorm, one_plus) if sandwich else None,
            norm2=_norm(
                layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
                one_plus,
            ),
            gate_up=_Projection([mlp.gate_proj, mlp.up_proj]),
            act=act,
            down=_Projection([mlp.down_proj]),
            post_mlp=_norm(layer.post_feedforward_layernorm, one_plus) if sandwich else None,
            scale=attn.scaling,
            window=window,
            rope=getattr(attn, "layer_type", None) if self.typed_rope else None,
        )

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Families this forward knows, with full rotary, gated MLPs and uncapped attention."""
        cfg = model.config
        inner = getattr(model, "model", None)
        if cfg.model_type not in MODEL_TYPES or inner is None:
            return False
        if getattr(cfg, "attn_logit_softcapping", None):
            return False
        if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
            return False
        return all(
            hasattr(layer, "self_attn")
            and hasattr(layer.mlp, "gate_proj")
            and hasattr(layer.mlp, "act_fn")
            for layer in inner.layers
        )

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str | None, tuple]:
        """cos, sin [T, head_dim] for each rotary the layers use."""
        out = {}
        for kind in {layer.rope for layer in self.layers}:
            cos, sin = self.rotary(h, positions[None], *([kind] if kind else []))
            out[kind] = cos[0].contiguous(), sin[0].contiguous()
        return out

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
        rope = self._rope(h, positions)
        windowed = {w: tokens.windowed(w) for w in {la.window for la in self.layers} if w}
        write = write_rows.flatten()
        residual, delta = h, None
        for i, layer in enumerate(self.layers):
            x = native.add_rmsnorm(delta, residual, *layer.norm1)
            qkv = layer.qkv(x)
            cos, sin = rope[layer.rope]
            dim = cos.shape[-1]
            nq, nk = self.heads * dim, self.kv_heads * dim
            if layer.q_norm is not None and layer.k_norm is not None:
                t = qkv.shape[0]
                qkv[:, :nq] = layer.q_norm(qkv[:, :nq].view(t, self.heads, dim)).view(t, nq)
                k = qkv[:, nq : nq + nk].view(t, self.kv_heads, dim)
                qkv[:, nq : nq + nk] = layer.k_norm(k).view(t, nk)
            native.rotary(qkv, self.heads + self.kv_heads, cos, sin)  # q and k heads
            k_cache, v_cache = kv.k[i], kv.v[i]
            native.kv_write(qkv, (nq, nq + nk), write, k_cache, v_cache)
            q = qkv[:, :nq].view(-1, self.heads, dim)
            tables = windowed[layer.window] if layer.window else tokens
            attn = native.paged_attention(q, k_cache, v_cache, tables, kv.block_size, layer.scale)
            delta = layer.o(attn.view(-1, nq))
            if layer.post_attn is not None:
                delta = native.add_rmsnorm(None, delta, *layer.post_attn)
            x = native.add_rmsnorm(delta, residual, *layer.norm2)
            gate_up = layer.gate_up(x)
            if layer.act is None:
                delta = layer.down(native.silu_mul(gate_up))
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                delta = layer.down(layer.act(gate) * up)
            if layer.post_mlp is not None:
                delta = native.add_rmsnorm(None, delta, *layer.post_mlp)
        if not len(last):  # only chunks before their prompts' last: nothing is sampled
            return h.new_empty(0, self.vocab)
        final = native.add_rmsnorm(delta, residual, *self.norm)
        logits = self.head(final[last])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _is_silu(act: nn.Module) -> bool:
    """transformers' own SiLU activation module (not a subclass of nn.SiLU)."""
    return type(act).__name__ == "SiLUActivation" or isinstance(act, nn.SiLU)
