"""The collectives a sharded forward makes, over the model ranks' process group, timed.

Per layer two all-reduces of the hidden states (after the row-parallel o
and down projections), one more after the vocabulary-parallel embedding
lookup, and the LM head's logit slices gathered on model rank 0, which
samples.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from kvmux.model.sharding import Shard


class Collectives:
    def __init__(self, shard: Shard, group) -> None:
        self.shard = shard
        self.group = group
        self.seconds = 0.0  # spent in collectives
        self.bytes = 0  # of tensors all-reduced or gathered, on this rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.seconds += time.perf_counter() - started
        self.bytes += x.numel() * x.element_size()
        return x

    def embed(self, lookup, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the whole embedding: each rank looks up the ids in its vocabulary slice, zeros elsewhere."""
        local = ids - self.shard.vocab.start
        inside = (local >= 0) & (local < self.shard.vocab_per_rank)
        rows = lookup(local.clamp(0, self.shard.vocab_per_rank - 1))
        return self.all_reduce(rows * inside[:, None].to(rows.dtype))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The whole vocabulary's logits on model rank 0 (None elsewhere), the padding cut off."""
        started = time.perf_counter()
        parts = [torch.empty_like(logits) for _ in range(self.shard.size)] if self.shard.rank == 0 else None
        dist.gather(logits.contiguous(), parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        self.seconds += time.perf_counter() - started
        self.bytes += logits.numel() * logits.element_size()
        return torch.cat(parts, dim=-1)[:, :self.shard.vocab_size] if parts is not None else None
