"""The model runner: turns one step's chunks into tensors, runs the forward, samples.

It runs on the engine's single forward thread and is the only code that
touches the KV pool tensor, so pool writes never race. The step's block copies
(copy-on-write, swaps, demotions, promotions) are applied here too, through
the copier, before the forward that may depend on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmux.cache.kv_cache import KVCache
from kvmux.cache.tiers import BlockCopy
from kvmux.cache.transfer import BlockCopier
from kvmux.engine.messages import Chunk
from kvmux.engine.sampler import Sampled, sample
from kvmux.model.forward_batch import ForwardBatch


@dataclass
class StepWork:
    chunks: list[Chunk]  # each with its block table; those with a draw get a token sampled
    copies: list[BlockCopy] = field(default_factory=list)  # in order, before the forward


class Runner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, copier: BlockCopier | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.copier = copier or BlockCopier([kv_cache.kv], kv_cache.geometry.block_bytes)

    @torch.inference_mode()
    def execute(self, work: StepWork) -> list[Sampled]:
        """Tokens sampled for the chunks with a draw, in their order; each followed by its forks' tokens."""
        # A copy out of a reclaimed block must read it before anything writes it.
        self.copier.apply(work.copies)
        self.copier.before_forward({b for c in work.chunks for b in c.block_table})
        batch = ForwardBatch.build(work.chunks, self.kv_cache.block_size, self.kv_cache.device)
        logits = self.model(batch, self.kv_cache)
        self.copier.after_forward()
        if logits is None:  # a tensor-parallel rank other than 0: rank 0 samples
            return []
        draws = [c.draw for c in work.chunks if c.draw is not None]
        rows = [i for i, d in enumerate(draws) for _ in range(1 + len(d.fork_seeds))]
        if len(rows) != len(draws):
            logits = logits[torch.tensor(rows, device=logits.device)]
        seeded = [(d, seed) for d in draws for seed in (d.seed, *d.fork_seeds)]
        return sample(logits, [d.params for d, _ in seeded], [seed for _, seed in seeded], [d.step for d, _ in seeded],
                      [d.output_ids for d, _ in seeded])

    def copy_bytes_per_s(self) -> float:
        return self.copier.bytes_per_s()

    def stats(self) -> dict:
        return self.copier.stats()
