"""The model runner: owns the model and the paged KV tensors, runs one packed forward per step.

Prefill chunks (each a run of a prompt's tokens after those already in the cache: a cached
prefix, earlier chunks) and decodes (one token per running sequence), the scheduler's plan
items as it made them, go into a single packed row. A chunk attends to its sequence's cached
keys and causally to its own tokens, as an unchunked prefill's tokens would; logits come back
only for the rows that are sampled: the last token of each final chunk, and each decode.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

from inferq.params import EngineConfig
from scheduler import DecodeWork, PrefillWork
from worker.engine import native
from worker.engine.attention import (
    ATTN_IMPLEMENTATION,
    DecodeGroup,
    PagedKV,
    Segment,
    StepLayout,
    stepping,
)
from worker.engine.families import attention_softcap, check_supported
from worker.engine.lean import LeanLlama
from worker.engine.loading import load_causal_lm
from worker.engine.memory import ModelShape, free_memory, plan_kv


class PagedRunner:
    """Loads a transformers causal LM with paged attention and a block-laid KV cache."""

    def __init__(
        self,
        model_path: str,
        *,
        device: torch.device,
        dtype: str,
        config: EngineConfig,
    ):
        check_supported(AutoConfig.from_pretrained(model_path))
        native.configure(config.kernel_dir)
        loaded = load_causal_lm(
            model_path, device, dtype, attn_implementation=ATTN_IMPLEMENTATION, config=config
        )
        self.model, self.kernel = loaded.model, loaded.kernel
        self.device, self.dtype, self.block_size = device, loaded.dtype, config.block_size
        cfg = self.model.config
        shape = ModelShape.of(cfg)
        self.plan = plan_kv(shape, self.dtype.itemsize, config, free_memory(device.type))
        head_dim = shape.head_dim
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.native = (
            config.native
            and not attention_softcap(cfg)
            and native.supports(self.dtype, device, head_dim, group, self.block_size)
        )
        if self.native and config.keep_heap:
            native.keep_heap()
        self.lean = (
            LeanLlama(self.model) if self.native and LeanLlama.supports(self.model) else None
        )
        self.kv = PagedKV.allocate(
            shape.layers,
            self.plan.blocks,
            self.block_size,
            shape.kv_heads,
            head_dim,
            self.dtype,
            device,
        )

    def _slot(self, block_table: list[int], pos: int) -> int:
        """Flat cache slot of position `pos`."""
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _shared_blocks(self, members: list[DecodeWork]) -> int:
        """Leading blocks common to every member's table and full for each of them."""
        shared = min(len(d.block_table) for d in members)
        for d in members:
            while d.block_table[:shared] != members[0].block_table[:shared]:
                shared -= 1
            shared = min(shared, (d.pos + 1) // self.block_size)
        return shared

    def _group_decodes(self, decodes: list[DecodeWork]) -> list[tuple[list[int], int]]:
        """Indices of decodes grouped by a shared prefix (with its length in blocks); those
        sharing nothing form one group without a prefix."""
        by_first: dict[int, list[int]] = {}
        for i, d in enumerate(decodes):
            by_first.setdefault(d.block_table[0], []).append(i)
        grouped, loose = [], []
        for members in by_first.values():
            shared = self._shared_blocks([decodes[i] for i in members]) if len(members) > 1 else 0
            if shared:
                grouped.append((members, shared))
            else:
                loose += members
        return grouped + ([(loose, 0)] if loose else [])

    def _blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.kv.block_rows(torch.tensor(block_ids, device=self.device))

    def _decode_group(self, start: int, members: list[DecodeWork], shared: int) -> DecodeGroup:
        """Block rows of a decode group: the shared prefix once, each member's own remaining
        blocks padded to the longest (padding masked)."""
        bs = self.block_size
        ends = [-(-(d.pos + 1) // bs) for d in members]  # blocks holding positions [0, pos]
        width = max(ends) - shared
        tables = [
            d.block_table[shared:end] + [0] * (width + shared - end)
            for d, end in zip(members, ends, strict=True)
        ]
        lengths = torch.tensor([d.pos + 1 - shared * bs for d in members], device=self.device)
        pad = torch.arange(width * bs, device=self.device)[None, :] >= lengths[:, None]
        prefix_rows = self._blocks(members[0].block_table[:shared]) if shared else None
        positions = torch.tensor([d.pos for d in members], device=self.device)
        return DecodeGroup(
            start,
            len(members),
            prefix_rows,
            self._blocks(tables),
            pad[None, :, None, :],
            positions,
        )

    def _segment(self, start: int, p: PrefillWork) -> Segment:
        """A prefill's context blocks (cached prefix + new tokens)."""
        length, context = len(p.token_ids), p.start_pos + len(p.token_ids)
        blocks = self._blocks(p.block_table[: -(-context // self.block_size)])
        return Segment(start, length, context, blocks)

    def _token_tables(
        self,
        prefills: list[PrefillWork],
        decodes: list[DecodeWork],
        groups: list[tuple[list[int], int]],
    ) -> native.TokenTables:
        """The C kernel's view of a step packed as prefills, then decodes group by group. A
        prefill's keys before each TILE_ROWS of its new tokens (the cached prefix, then its own
        earlier tokens) and a decode group's shared blocks become tiles."""
        seqs = [p.block_table for p in prefills]
        seq_of: list[int] = []
        ctx: list[int] = []
        key_from: list[int] = []
        tiles: list[tuple[int, int, int, int]] = []  # first token, rows, table row, keys

        def add(row: int, rows: int, keys: int) -> None:  # the last `rows` tokens share `keys`
            for first in range(len(ctx) - rows, len(ctx), native.TILE_ROWS) if keys else ():
                tiles.append((first, min(native.TILE_ROWS, len(ctx) - first), row, keys))
            key_from.extend([keys] * rows)

        for k, p in enumerate(prefills):  # TILE_ROWS new tokens see all keys before them
            for off in range(0, len(p.token_ids), native.TILE_ROWS):
                rows, keys = min(native.TILE_ROWS, len(p.token_ids) - off), p.start_pos + off
                seq_of += [k] * rows
                ctx += range(keys + 1, keys + rows + 1)
                add(k, rows, keys)
        for members, shared in groups:
            first_row = len(seqs)
            for i in members:
                seq_of.append(len(seqs))
                seqs.append(decodes[i].block_table)
                ctx.append(decodes[i].pos + 1)
            add(first_row, len(members), shared * self.block_size if len(members) > 1 else 0)
        width = max(map(len, seqs))

        def int32(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32)

        return native.TokenTables(
            int32([t + [0] * (width - len(t)) for t in seqs]),
            int32(seq_of),
            int32(ctx),
            int32(key_from),
            *(int32([t[k] for t in tiles]) for k in range(4)),
        )

    @staticmethod
    def _decode_rows(planned: list[DecodeWork], plain: list[int], verify: list[range]) -> list[int]:
        """The logits rows of the ``planned`` decodes in their order: ``plain`` (a row each, in
        the order of those without drafts) and ``verify`` (the rows of each with drafts)."""
        plain_rows, verify_rows = iter(plain), iter(verify)
        rows: list[int] = []
        for d in planned:
            rows += next(verify_rows) if d.draft else [next(plain_rows)]
        return rows

    @torch.inference_mode()
    def forward(self, prefills: list[PrefillWork], decodes: list[DecodeWork]) -> torch.Tensor:
        """Logits [final prefills + decodes' positions, vocab]: at the last token of each final
        chunk, then at each decode's token and its drafts (`StepPlan.sampled`'s order); other
        chunks only fill the cache. A decode with drafts is computed as a chunk of its
        positions (causal over its own tokens, as a prompt's chunk is)."""
        planned, verify = decodes, [d for d in decodes if d.draft]
        decodes = [d for d in planned if not d.draft] if verify else planned
        chunks = prefills + [
            PrefillWork(d.seq, [d.token_id, *d.draft], d.pos, d.block_table, final=True)
            for d in verify
        ]
        ids: list[int] = []
        positions: list[int] = []
        write: list[int] = []  # cache slot of each packed token
        segments: list[Segment] = []
        last: list[int] = []
        verify_rows: list[range] = []
        for k, p in enumerate(chunks):
            if not self.native:
                segments.append(self._segment(len(ids), p))
            ids += p.token_ids
            positions += range(p.start_pos, p.start_pos + len(p.token_ids))
            write += [self._slot(p.block_table, pos) for pos in positions[-len(p.token_ids) :]]
            if k >= len(prefills):
                verify_rows.append(range(len(ids) - len(p.token_ids), len(ids)))
            elif p.final:
                last.append(len(ids) - 1)
        decode_groups, decode_last = [], [0] * len(decodes)
        groups = self._group_decodes(decodes)
        for members, shared in groups:
            if not self.native:
                decode_groups.append(
                    self._decode_group(len(ids), [decodes[i] for i in members], shared)
                )
            for i in members:
                d = decodes[i]
                ids.append(d.token_id)
                positions.append(d.pos)
                write.append(self._slot(d.block_table, d.pos))
                decode_last[i] = len(ids) - 1
        last += self._decode_rows(planned, decode_last, verify_rows) if verify else decode_last
        write_rows = self.kv.slot_rows(torch.tensor(write, device=self.device))
        layout = StepLayout(self.kv, write_rows, segments, decode_groups)
        if self.native:
            layout.tokens = self._token_tables(chunks, decodes, groups)
        ids_t = torch.tensor(ids, device=self.device)
        positions_t = torch.tensor(positions, device=self.device)
        last_t = torch.tensor(last, dtype=torch.long, device=self.device)
        if self.lean is not None and layout.tokens is not None:
            return self.lean.forward(ids_t, positions_t, self.kv, write_rows, layout.tokens, last_t)
        with stepping(layout):
            out = self.model(
                input_ids=ids_t[None],
                position_ids=positions_t[None],
                use_cache=False,
                logits_to_keep=last_t,
            )
        return out.logits[0]
