"""The model runner: turns one step's chunks into tensors, runs the forward, samples.

It runs on the engine's single forward thread and is the only code that
touches the KV pool tensor, so pool writes never race. The step's block copies
(copy-on-write, swaps, demotions, promotions) are applied here too, through
the copier, before the forward that may depend on them.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import replace

import torch

from kvmux.cache.disk_store import DiskStore
from kvmux.cache.kv_cache import KVCache
from kvmux.cache.pool_plan import PoolPlan
from kvmux.cache.transfer import BlockCopier, host_pool, make_copier
from kvmux.runner.k_mean import set_k_mean
from kvmux.runner.sampler import mask_logits, sample, verify
from kvmux.step.forward_batch import ForwardBatch
from kvmux.step.work import Chunk, Draw, Sampled, StepWork


class Runner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, copier: BlockCopier | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.copier = copier or BlockCopier([kv_cache.kv])
        self.mask_wait_seconds = 0.0  # how long sampling waited for structured outputs' masks after the forward

    @classmethod
    def build(cls, model: torch.nn.Module, pool: PoolPlan, num_host_blocks: int, num_host_sliding_blocks: int,
              disks: dict[int, DiskStore], device: str, k_mean: torch.Tensor | None = None) -> Runner:
        """A runner over fresh pools: the device's KV pool, the host tier (pinned where the device is a GPU, for
        asynchronous copies) and the disk tier's stores by tier (DISK, and DISK_SLIDING with a sliding pool), if
        any; with sliding-window layers their device pool, and a host pool of slots (pool_plan.host_blocks). An
        int8 pool gets `k_mean` (runner/k_mean.py: pool_k_mean, which the disk store's fingerprint names)."""
        sliding = KVCache(pool.num_sliding_blocks, pool.sliding_geometry, device) if pool.num_sliding_blocks else None
        kv_cache = KVCache(pool.num_blocks, pool.geometry, device, sliding)
        if k_mean is not None:
            set_k_mean(kv_cache, k_mean, model.config.layer_types)
        pinned = kv_cache.kv.is_cuda
        host_sliding = None
        if num_host_sliding_blocks:
            host_sliding = host_pool(pool.sliding_geometry, num_host_sliding_blocks, pinned)
        pools = [kv_cache.kv, host_pool(pool.geometry, num_host_blocks, pinned), None, sliding and sliding.kv,
                 host_sliding, None]
        for tier, disk in disks.items():
            pools[tier] = disk.tensor
        return cls(model, kv_cache, make_copier(pools, disks))

    @torch.inference_mode()
    def execute(self, work: StepWork) -> list[list[Sampled]]:
        """The tokens each chunk with a draw emits, in their order, each followed by its forks': a run of one
        token, or with drafts the accepted ones and the token after them; with `work.steps` > 1, the token of
        each of the steps."""
        if work.steps > 1:
            self._check_steps(work)
        # A copy out of a reclaimed block must read it before anything writes it.
        self.copier.apply(work.copies)
        self.copier.before_forward({b for c in work.chunks for b in c.block_table})
        runs = self._forward(work.chunks, work.masks)
        chunks = work.chunks
        for _ in range(work.steps - 1):
            # Each sequence's newest token is the next forward's input, one position on, the next in its stream.
            chunks = [replace(c, position=c.position + len(c.token_ids), token_ids=[run[-1].token],
                              draw=replace(c.draw, token_index=c.draw.token_index + 1,
                                           output_ids=c.draw.output_ids + [run[-1].token] if c.draw.params.penalized
                                           else c.draw.output_ids))
                      for c, run in zip(chunks, runs)]
            for run, more in zip(runs, self._forward(chunks, None)):
                run += more
        return runs

    def _check_steps(self, work: StepWork) -> None:
        """Steps after the first feed each chunk its own sampled token: every chunk must be a plain decode, with
        sliding-window slots (where the pool has them) for every token the run writes."""
        bs = self.kv_cache.block_size
        for c in work.chunks:
            if c.draw is None or c.draw.drafts or c.draw.fork_seeds or c.draw.mask_row is not None:
                raise ValueError(f"a step of {work.steps} forwards needs every chunk to draw one token without "
                                 f"drafts, forks or a mask; {c.seq_id!r} does not")
            end = -(-(c.position + work.steps) // bs)
            if self.kv_cache.sliding is not None and (len(c.sliding_table) < end
                                                      or min(c.sliding_table[c.position // bs:end]) < 0):
                last = c.position + work.steps - 1
                raise ValueError(f"a step of {work.steps} forwards writes tokens {c.position}..{last} of "
                                 f"{c.seq_id!r}, whose sliding-window table holds no slot for some of them")

    def _forward(self, chunks: list[Chunk], masks: torch.Tensor | Future | None) -> list[list[Sampled]]:
        """One forward over the chunks, and the runs their draws emit."""
        batch = ForwardBatch.build(chunks, self.kv_cache.block_size, self.kv_cache.device)
        logits = self.model(batch, self.kv_cache)
        self.copier.after_forward()
        if logits is None:  # a tensor-parallel rank other than 0: rank 0 samples
            return []
        # One group of rows per sample: a draw's logits rows, shared by its forks (which have no drafts).
        groups: list[tuple[Draw, int, int]] = []  # (draw, seed, first row in `index`)
        index: list[int] = []  # logits row of each sampled row
        constrained: list[tuple[int, int]] = []  # (sampled row, mask row)
        first = 0
        for d in (c.draw for c in chunks if c.draw is not None):
            width = 1 + len(d.drafts)
            for seed in (d.seed, *d.fork_seeds):
                groups.append((d, seed, len(index)))
                if d.mask_row is not None:
                    constrained += [(len(index) + j, d.mask_row + j) for j in range(width)]
                index.extend(range(first, first + width))
            first += width
        if len(index) != logits.shape[0]:
            logits = logits[torch.tensor(index, device=logits.device)]
        if masks is not None:
            started = time.perf_counter()
            masks = masks.result() if isinstance(masks, Future) else masks
            self.mask_wait_seconds += time.perf_counter() - started
            logits = mask_logits(logits, masks, [i for i, _ in constrained], [m for _, m in constrained])
        plain = [g for g in groups if not g[0].drafts]  # sampled together; each draw with drafts is verified
        drawn = iter(())
        if plain:
            rows = logits if len(plain) == len(index) else \
                logits[torch.tensor([row for _, _, row in plain], device=logits.device)]
            drawn = iter(sample(rows, [d.params for d, _, _ in plain], [seed for _, seed, _ in plain],
                                [d.token_index for d, _, _ in plain], [d.output_ids for d, _, _ in plain]))
        return [verify(logits[row:row + 1 + len(d.drafts)], d.params, seed, d.token_index, d.output_ids, d.drafts)
                if d.drafts else [next(drawn)] for d, seed, row in groups]

    def copy_bytes_per_s(self) -> float:
        return self.copier.bytes_per_s()

    def stats(self) -> dict:
        return {**self.copier.stats(), "structured_mask_wait_seconds": self.mask_wait_seconds}

    def close(self) -> None:
        """Close the disk tier's stores (their blocks stay for the next engine); call once no step runs any more."""
        for tier, disk in self.copier.disks.items():
            self.copier.pools[tier] = None
            disk.close()
        self.copier.disks = {}
