"""The model runner: turns one step's plan into tensors, runs the forward, samples.

It runs on the engine's single forward thread and is the only code that
touches the KV pool tensor, so pool writes never race. Copies between the
device pool and the host and disk tiers (swaps) are applied here too, through
the swapper, before the forward that may depend on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmux.model.forward_batch import ForwardBatch, SeqChunk
from kvmux.cache.kv_cache import KVCache
from kvmux.sampling import SamplingParams, sample
from kvmux.cache.transfer import Swapper
from kvmux.cache.tiers import Op


@dataclass
class SeqWork:
    """One sequence's part of a step: new tokens from position start, and how to sample (None: no sampling)."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    params: SamplingParams | None = None
    seed: int = 0
    step: int = 0
    # Seeds of further parallel samples that draw their first token from these
    # same logits (the prompt is computed once for all n samples).
    fork_seeds: list[int] = field(default_factory=list)


@dataclass
class StepWork:
    seqs: list[SeqWork]
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies, before the forward
    swaps: list[Op] = field(default_factory=list)  # copies between tiers, in order, before everything else


class Runner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, swapper: Swapper | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.swapper = swapper or Swapper([kv_cache.kv])

    @torch.inference_mode()
    def execute(self, work: StepWork) -> list[int]:
        """Tokens sampled for the sequences that asked for one, in their order; each followed by its forks' tokens."""
        # Swaps first: a copy out of a reclaimed block must read it before anything writes it.
        self.swapper.apply(work.swaps)
        self.swapper.before_forward({b for s in work.seqs for b in s.block_table} | {b for c in work.copies for b in c})
        if work.copies:
            self.kv_cache.copy_blocks(work.copies)
        chunks = [SeqChunk(s.token_ids, s.start, s.block_table, want_logits=s.params is not None) for s in work.seqs]
        batch = ForwardBatch.build(chunks, self.kv_cache.block_size, self.kv_cache.device)
        logits = self.model(batch, self.kv_cache)
        self.swapper.after_forward()
        chosen = [s for s in work.seqs if s.params is not None]
        rows = [i for i, s in enumerate(chosen) for _ in range(1 + len(s.fork_seeds))]
        if len(rows) != len(chosen):
            logits = logits[torch.tensor(rows, device=logits.device)]
        draws = [(s, seed) for s in chosen for seed in (s.seed, *s.fork_seeds)]
        return sample(logits, [s.params for s, _ in draws], [seed for _, seed in draws], [s.step for s, _ in draws])
