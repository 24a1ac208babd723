"""The packed, unpadded batch the engine hands to the model for one step."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvmux.step.work import Chunk


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor       # [T] int64, new tokens of all sequences, packed sequence after sequence
    positions: torch.Tensor       # [T] int64, absolute position of each new token
    slot_mapping: torch.Tensor    # [T] int64, KV slot of each new token: block_id * block_size + offset
    query_lens: list[int]         # [S] new tokens per sequence, in packing order
    context_lens: list[int]       # [S] tokens in the KV cache for that sequence after this step
    block_tables: torch.Tensor    # [S, max_blocks] int32, padded with 0
    # [K] int64 packed indices whose logits are returned: a drawn chunk's last token, after its drafts' positions
    logits_indices: torch.Tensor
    # Scratch for the attention backend: per-step metadata it derives once from
    # this batch and reuses in every layer.
    attn_metadata: Any = field(default=None, repr=False, compare=False)
    # With a sliding-window pool (KVCache.sliding): the same batch over that pool's slots, for its layers.
    sliding: ForwardBatch | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @classmethod
    def build(cls, seqs: list[Chunk], block_size: int, device: torch.device | str = "cpu") -> ForwardBatch:
        """From each chunk's tokens, position and block table; logits for the last token of chunks with a draw,
        and for the len(drafts) tokens before it (a draft's logits verify the draft after it). Chunks with
        sliding tables (all or none) give the batch its `sliding` twin."""
        if not seqs:
            raise ValueError("ForwardBatch.build: no sequences")
        query_lens = [len(s.token_ids) for s in seqs]
        if min(query_lens) == 0:
            raise ValueError("ForwardBatch.build: a sequence has no new tokens")
        context_lens = [s.position + n for s, n in zip(seqs, query_lens)]
        for s, ctx in zip(seqs, context_lens):
            if len(s.block_table) * block_size < ctx:
                raise ValueError(
                    f"block table of {len(s.block_table)} blocks cannot hold {ctx} tokens "
                    f"(block_size {block_size})")

        # Built as Python lists, a run of slots per block, then one tensor per field: a decode step's few
        # tokens would otherwise pay for a dozen small tensor ops, and a prefill chunk's slots come a block at a
        # time either way.
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        for s, n in zip(seqs, query_lens):
            positions.extend(range(s.position, s.position + n))
            slots.extend(_slot_runs(s.block_table, s.position, n, block_size))
            if s.draw is not None:
                logits_indices.extend(range(len(positions) - 1 - len(s.draw.drafts), len(positions)))
        input_ids = [t for s in seqs for t in s.token_ids]

        def tensor(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=device)

        batch = cls(
            input_ids=tensor(input_ids),
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=cls._tables([s.block_table for s in seqs], device),
            logits_indices=tensor(logits_indices),
        )
        with_sliding = sum(bool(s.sliding_table) for s in seqs)
        if with_sliding:
            if with_sliding < len(seqs):
                raise ValueError("ForwardBatch.build: some chunks have sliding tables and some not")
            sliding_slots = []
            for s, n in zip(seqs, query_lens):
                sliding_slots.extend(_slot_runs(s.sliding_table, s.position, n, block_size, "sliding slot"))
            # Blocks no query sees (-1) name slot 0, a real block: the native kernels start at or shortly before
            # each tile's first window (the int8 kernel at its 32-key chunk) and mask what they read there; the
            # torch reference gathers it (finite KV) and masks it out.
            batch.sliding = replace(batch, slot_mapping=tensor(sliding_slots),
                                    block_tables=cls._tables([[max(b, 0) for b in s.sliding_table] for s in seqs],
                                                             device))
        return batch

    @staticmethod
    def _tables(rows: list[list[int]], device: torch.device | str) -> torch.Tensor:
        """[S, max_blocks] int32, padded with 0."""
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)


def _slot_runs(table: list[int], start: int, n: int, block_size: int, what: str = "block") -> list[int]:
    """The KV slots of positions [start, start + n) under a block table, one range per block."""
    slots: list[int] = []
    pos, end = start, start + n
    while pos < end:
        index, offset = divmod(pos, block_size)
        stop = min(end, (index + 1) * block_size)
        if table[index] < 0:
            raise ValueError(f"ForwardBatch.build: a new token's block has no {what}")
        first = table[index] * block_size + offset
        slots.extend(range(first, first + stop - pos))
        pos = stop
    return slots
