"""Per-sequence token sampling (greedy rows batched)."""

from __future__ import annotations

import torch

from worker.engine.api import SamplingParams

INVALID = -1  # `sample_next`'s token for a row with no valid distribution to draw from


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator for reproducible sampling, or None (global RNG / greedy)."""
    if params.temperature == 0 or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token crossing top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token drawn from a row's tempered, filtered distribution, or `INVALID`."""
    probs = _filter_top_k_top_p(row.float() / p.temperature, p.top_k, p.top_p).softmax(-1)
    if not bool(torch.isfinite(probs).all()) or not probs.sum() > 0:
        return INVALID
    return int(torch.multinomial(probs, 1, generator=gen)[0])


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next token id per row of `logits` (rows x vocab): greedy rows batched, sampled rows each.
    A row whose logits hold NaN or +inf, or whose tempered distribution is not finite (or
    keeps nothing), gets `INVALID` instead: that sequence fails, the other rows are untouched."""
    kept = sample_verified(logits, params, generators, [()] * len(params))
    return torch.tensor([tokens[0] for tokens in kept])


def sample_verified(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    drafts: list[tuple[int, ...]],
) -> list[list[int]]:
    """The tokens each sequence keeps: its rows of `logits` are `1 + len(draft)` consecutive
    ones (the positions of its fed token and of each drafted token). Position by position a
    token is sampled as `sample_next` would (argmax, or a draw from the generator); while it
    equals the next drafted token, that draft is accepted and the next position is sampled;
    the first that differs, or the one after the last draft, ends the list.

    For a draft that is one proposed token (prompt lookup), this is rejection sampling: the
    draft is accepted with probability p(draft), and on rejection the token is distributed
    as p without the draft, renormalised: the target distribution. And it draws from the
    generator exactly as decoding without drafts would (one draw per kept token), so seeded
    outputs do not depend on what was drafted. A list ending in `INVALID`: that row had no
    valid distribution (the sequence fails)."""
    best = logits.max(-1)  # = argmax (first of ties); CPU argmax is 5x slower in bf16
    greedy = best.indices.tolist()
    finite = torch.isfinite(best.values).tolist()  # max propagates NaN: one check per row
    kept_lists: list[list[int]] = []
    row = 0
    for p, gen, draft in zip(params, generators, drafts, strict=True):
        kept: list[int] = []
        for i in range(len(draft) + 1):
            r = row + i
            if not finite[r]:
                token = INVALID
            else:
                token = greedy[r] if p.temperature == 0 else _draw(logits[r], p, gen)
            kept.append(token)
            if token == INVALID or i == len(draft) or token != draft[i]:
                break
        kept_lists.append(kept)
        row += len(draft) + 1
    return kept_lists
