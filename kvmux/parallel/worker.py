"""A tensor-parallel rank: its slice of the model and of the KV pool, running one step per message.

Started by the engine (`python -m kvmux.parallel.worker`, one process per
local rank) or, on another machine, by `kvmux worker`. Global rank 0 is the
engine's driver, which holds no weights; ranks 1..N are the model ranks
0..N-1. A step arrives as one broadcast object (the runner's StepWork: the
chunks with their block tables and draws, and the block copies); every
model rank applies the copies to its own slices, runs the forward (the
collectives join the ranks inside it), and model rank 0 samples and sends
the tokens back to the driver.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kvmux.step.work import Sampled, StepWork

if TYPE_CHECKING:
    from kvmux.cache.pool_plan import PoolPlan


@dataclass
class Spec:
    """What every rank must agree on, sent by the driver once the group is up."""

    model: str  # what the driver loaded: a folder, or a GGUF the driver has converted (the ranks find it cached)
    dtype: str
    quantization: str
    device: str
    attention_backend: str
    pool: PoolPlan  # the device's pools, of a rank's KV heads
    num_host_blocks: int
    num_host_sliding_blocks: int
    num_disk_blocks: int  # slots of each disk store
    disk_cache_dir: str | None
    size: int  # model ranks
    # The disk tier's store: its fingerprint and what that stands for (each rank keeps its slice in DIR/rank-N/).
    disk_key: str = ""
    disk_meta: dict | None = None
    # With the sliding-window pool, its slots' store beside it, as one process keeps (each rank's slice in
    # DIR/sliding-window-layers/rank-N/); "" where there is none.
    sliding_disk_key: str = ""
    sliding_disk_meta: dict | None = None


def fingerprint(config, spec: Spec) -> str:
    """What a rank loaded and how: ranks whose fingerprints differ would compute nonsense together."""
    settings = {k: v for k, v in vars(spec).items() if k != "model"}
    return hashlib.sha256(json.dumps([config.to_dict(), settings], sort_keys=True, default=str).encode()).hexdigest()


def timeout() -> timedelta:
    # A collective that waits longer means a rank is gone or stuck; the driver pings idle ranks well within it.
    return timedelta(seconds=float(os.environ.get("KVMUX_TP_TIMEOUT", "30")))


def model_group(size: int):
    """The model ranks' group (global ranks 1..size); every process of the world must create it."""
    return dist.new_group(list(range(1, size + 1)), timeout=timeout())


def serve(rank: int, world_size: int, init_method: str, threads: int, model_override: str | None) -> None:
    from kvmux.cache.disk_store import DiskStore
    from kvmux.cache.tiers import DISK, DISK_SLIDING
    from kvmux.model.loader import load_model, load_model_info
    from kvmux.model.sharding import Shard
    from kvmux.ops.threads import set_threads
    from kvmux.parallel.collectives import Collectives
    from kvmux.runner.k_mean import digest as k_mean_digest
    from kvmux.runner.k_mean import pool_k_mean
    from kvmux.runner.runner import Runner

    set_threads(threads)
    torch.set_num_threads(1)  # the kernels' pool does the parallel work (Engine.start says why)
    dist.init_process_group("gloo", init_method=init_method, world_size=world_size, rank=rank, timeout=timeout())
    spec_holder = [None]
    dist.broadcast_object_list(spec_holder, src=0)
    spec: Spec = spec_holder[0]
    group = model_group(spec.size)
    shard = Shard.of(load_model_info(model_override or spec.model).config, rank - 1, spec.size)
    collectives = Collectives(shard, group)
    dtype = getattr(torch, spec.dtype)
    loaded = load_model(model_override or spec.model, dtype, spec.device, progress=False,
                        attention_backend=spec.attention_backend, quantization=spec.quantization,
                        collectives=collectives)
    model = loaded.model
    geometry = spec.pool.geometry
    k_mean = pool_k_mean(model, geometry)  # every rank at once: its forward is collective
    disks, opened = {}, {}
    if spec.num_disk_blocks:
        # Each rank keeps its slice of every block in a store of its own; the driver serves the blocks that every
        # rank's store holds whole (Opened.common). An int8 pool's store is also named by the rank's k_mean.
        stores = {DISK: (os.path.join(spec.disk_cache_dir, f"rank-{rank}"), spec.disk_key, spec.disk_meta, geometry)}
        if spec.sliding_disk_key:
            stores[DISK_SLIDING] = (os.path.join(spec.disk_cache_dir, "sliding-window-layers", f"rank-{rank}"),
                                    spec.sliding_disk_key, spec.sliding_disk_meta, spec.pool.sliding_geometry)
        for tier, (folder, key, meta, shape) in stores.items():
            key = key if k_mean is None else f"{key}-{k_mean_digest(k_mean)}"
            disks[tier] = DiskStore(folder, key, {**(meta or {}), "rank": rank}, shape, spec.num_disk_blocks)
            opened[tier] = disks[tier].open()
    runner = Runner.build(model, spec.pool, spec.num_host_blocks, spec.num_host_sliding_blocks, disks, spec.device,
                          k_mean)
    dist.gather_object((fingerprint(loaded.config, spec), opened), None, dst=0)
    compute_seconds = 0.0
    try:
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            kind, payload = message[0]
            if kind == "step":
                work, touched = payload
                for tier, blocks in touched.items():
                    disks[tier].touched(blocks)
                started = time.perf_counter()
                tokens = runner.execute(work)  # runs of Sampled, on rank 0
                compute_seconds += time.perf_counter() - started
                if shard.rank == 0:  # the tokens, and this rank's counters for the driver's stats
                    copies = runner.copier.stats()
                    counters = [compute_seconds - collectives.seconds, collectives.seconds, collectives.bytes,
                                copies["block_copy_bytes"], copies["block_copy_seconds"],
                                copies["block_copy_wait_seconds"]]
                    dist.send(torch.tensor(counters + pack_samples(tokens, work), dtype=torch.float64), dst=0)
            elif kind == "stop":
                return
            elif kind == "refused":
                raise RuntimeError(f"the engine refused this rank: {payload}")
            # "ping": the driver keeps idle ranks' waits short of the timeout
    finally:
        runner.close()
        dist.destroy_process_group()


def sample_widths(work: StepWork) -> list[tuple[int, int]]:
    """(tokens, floats per token) of each sampled row of `work` in rank 0's reply: a row emits up to one token
    more than it has drafts, each its id and, with logprobs asked for, its logprob and `logprobs` (id, logprob)
    pairs. The driver knows the step, so the reply needs no lengths but each row's count of tokens emitted."""
    return [(1 + len(c.draw.drafts), 1 if c.draw.params.logprobs is None else 2 + 2 * c.draw.params.logprobs)
            for c in work.chunks if c.draw is not None for _ in range(1 + len(c.draw.fork_seeds))]


def reply_size(work: StepWork) -> int:
    return sum(1 + most * width for most, width in sample_widths(work))


def pack_samples(runs: list[list[Sampled]], work: StepWork) -> list[float]:
    """Each row's run as float64s (token ids and float32 logprobs are exact): its length, then its tokens,
    padded to the most it may emit; missing alternatives (the filters left fewer tokens than asked) are NaN pairs."""
    out = []
    for run, (most, width) in zip(runs, sample_widths(work)):
        out.append(len(run))
        for s in run:
            out.append(s.token)
            if width > 1:
                out.append(s.logprob)
                for i in range((width - 2) // 2):
                    out.extend(s.top[i] if i < len(s.top) else (math.nan, math.nan))
        out.extend([0.0] * ((most - len(run)) * width))
    return out


def unpack_samples(values: list[float], work: StepWork) -> list[list[Sampled]]:
    runs, i = [], 0
    for most, width in sample_widths(work):
        run, at = [], i + 1
        for _ in range(int(values[i])):
            token = int(values[at])
            if width == 1:
                run.append(Sampled(token))
            else:
                pairs = values[at + 2:at + width]
                top = [(int(t), v) for t, v in zip(pairs[::2], pairs[1::2]) if not math.isnan(t)]
                run.append(Sampled(token, values[at + 1], top))
            at += width
        runs.append(run)
        i += 1 + most * width
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmux.parallel.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, required=True, help="global rank (1..N; 0 is the driver)")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--init-method", required=True, help="torch.distributed init method, e.g. tcp://host:port")
    p.add_argument("--threads", type=int, default=1, help="kernel threads of this rank")
    p.add_argument("--model", default=None, help="the model as this machine has it (default: the driver's path)")
    args = p.parse_args(argv)
    try:
        serve(args.rank, args.world_size, args.init_method, args.threads, args.model)
    except Exception as exc:  # noqa: BLE001 - a rank's death is reported by its peers; say why here too
        print(f"kvmux worker rank {args.rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
