"""The model runner: turns one step's chunks into tensors, runs the forward, samples.

It runs on the engine's single forward thread and is the only code that
touches the KV pool tensor, so pool writes never race. The step's block copies
(copy-on-write, swaps, demotions, promotions) are applied here too, through
the copier, before the forward that may depend on them.
"""
from __future__ import annotations

import time
from concurrent.futures import Future

import torch

from kvmux.cache.kv_cache import KVCache, PoolGeometry
from kvmux.cache.tiers import DISK
from kvmux.cache.transfer import BlockCopier, DiskPool, host_pool, make_copier
from kvmux.runner.sampler import mask_logits, sample
from kvmux.step.forward_batch import ForwardBatch
from kvmux.step.work import Sampled, StepWork


class Runner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, copier: BlockCopier | None = None,
                 disk_pool: DiskPool | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.copier = copier or BlockCopier([kv_cache.kv], kv_cache.geometry.block_bytes)
        self.disk_pool = disk_pool
        self.mask_wait_seconds = 0.0  # how long sampling waited for structured outputs' masks after the forward

    @classmethod
    def build(cls, model: torch.nn.Module, geometry: PoolGeometry, num_blocks: int, num_host_blocks: int,
              num_disk_blocks: int, disk_cache_dir: str | None, device: str) -> Runner:
        """A runner over fresh pools: the device's KV pool, the host tier (pinned where the device is a GPU, for
        asynchronous copies) and, with disk blocks, the disk tier's file in disk_cache_dir."""
        kv_cache = KVCache(num_blocks, geometry, device)
        disk_pool = DiskPool(geometry, num_disk_blocks, disk_cache_dir) if num_disk_blocks else None
        pools = [kv_cache.kv, host_pool(geometry, num_host_blocks, pinned=kv_cache.kv.is_cuda),
                 disk_pool and disk_pool.tensor]
        return cls(model, kv_cache, make_copier(pools, geometry.block_bytes), disk_pool)

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
        if work.masks is not None:
            started = time.perf_counter()
            masks = work.masks.result() if isinstance(work.masks, Future) else work.masks
            self.mask_wait_seconds += time.perf_counter() - started
            constrained = [(i, d.mask_row) for i, (d, _) in enumerate(seeded) if d.mask_row is not None]
            logits = mask_logits(logits, masks, [i for i, _ in constrained], [m for _, m in constrained])
        return sample(logits, [d.params for d, _ in seeded], [seed for _, seed in seeded],
                      [d.token_index for d, _ in seeded], [d.output_ids for d, _ in seeded])

    def copy_bytes_per_s(self) -> float:
        return self.copier.bytes_per_s()

    def stats(self) -> dict:
        return {**self.copier.stats(), "structured_mask_wait_seconds": self.mask_wait_seconds}

    def close(self) -> None:
        """Delete the disk tier's file; call once no step runs any more."""
        if self.disk_pool is not None:
            self.copier.pools[DISK] = None
            self.disk_pool.close()
            self.disk_pool = None
