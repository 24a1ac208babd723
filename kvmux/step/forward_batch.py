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

        block_tables = cls._tables([s.block_table for s in seqs])

        # Per-token quantities are derived with tensor ops rather than a python
        # loop over tokens, which would dominate for long prefill chunks.
        lens = torch.tensor(query_lens)
        ends = torch.cumsum(lens, 0)
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), lens)
        starts = torch.tensor([s.position for s in seqs])
        token_idx = torch.arange(int(ends[-1]))
        positions = token_idx - (ends - lens)[seq_of_token] + starts[seq_of_token]
        blocks = block_tables[seq_of_token, positions // block_size].long()
        slot_mapping = blocks * block_size + positions % block_size

        input_ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64)
        logits_indices = torch.tensor([i for s, end in zip(seqs, ends.tolist()) if s.draw is not None
                                       for i in range(end - 1 - len(s.draw.drafts), end)], dtype=torch.int64)
        batch = cls(
            input_ids=input_ids.to(device),
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=block_tables.to(device),
            logits_indices=logits_indices.to(device),
        )
        with_sliding = sum(bool(s.sliding_table) for s in seqs)
        if with_sliding:
            if with_sliding < len(seqs):
                raise ValueError("ForwardBatch.build: some chunks have sliding tables and some not")
            tables = cls._tables([s.sliding_table for s in seqs])
            slots = tables[seq_of_token, positions // block_size].long()
            if (slots < 0).any():
                raise ValueError("ForwardBatch.build: a new token's block has no sliding slot")
            # Blocks no query sees (-1) name slot 0, a real block: the native kernels start at or shortly before
            # each tile's first window (the int8 kernel at its 32-key chunk) and mask what they read there; the
            # torch reference gathers it (finite KV) and masks it out.
            batch.sliding = replace(batch, slot_mapping=(slots * block_size + positions % block_size).to(device),
                                    block_tables=tables.clamp(min=0).to(device))
        return batch

    @staticmethod
    def _tables(rows: list[list[int]]) -> torch.Tensor:
        """[S, max_blocks] int32, padded with 0."""
        tables = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.int32)
        for i, row in enumerate(rows):
            tables[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return tables
