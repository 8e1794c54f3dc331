"""The GPTQ recipe: what `inferq model quantize` and `model prepare` quantize with (no torch
here: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GptqSpec:
    """How to quantize: by default the recipe `inferq model prepare` uses for the default model
    (4-bit, asymmetric, act-order with static groups, clipping search), group size picked
    from the model.

    sym=False gives each group its own integer zero point (asymmetric range). act_order
    quantizes columns in order of decreasing activation size (GPTQ desc_act); static_groups
    fixes each group's columns before that reordering (groups stay consecutive columns: no input
    gather at inference); without act_order, gptqmodel's group-aware order, which also keeps
    each group's columns together. mse > 0 searches each group's clipping range under that norm
    instead of min/max, over clip_steps ranges (gptqmodel's own search: 80, down to 0.21 of
    the min/max range; on the default model 99.99 % of the chosen ranges are within the first
    11: worker/prep/clipping.py). samples calibration texts, each cut to max_tokens tokens
    (0: whole)."""

    bits: int = 4
    group_size: int | None = None
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    mse: float = 2.4
    clip_steps: int = 20  # clipping ranges tried, shrinking by 1 % each: 1.0 down to 0.81
    samples: int = 240
    max_tokens: int = 64  # calibration texts cut to this many tokens; 0: whole texts
    batch_size: int = 16
    seed: int = 0
