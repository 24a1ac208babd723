"""kvmux through its asyncio API or, with the job's transport "http", through its HTTP server and a client in
another process (bench/http_load.py); plus a sampler of the KV pool for the waste and occupancy figures."""
from __future__ import annotations

import asyncio
import json
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.job import Job
from bench.metrics import Timing, summarize
from kvmux import Engine, SamplingParams

ROOT = Path(__file__).resolve().parent.parent.parent

BLOCK_SIZE = 16
SAMPLE_INTERVAL_S = 0.02  # pool sampling period: a few hundred µs of work each, off the forward thread
MAX_TRACE_SAMPLES = 600  # kept in the results file (the plot needs no more)

# Counters that accumulate over the engine's life; the timed run reports their growth.
_COUNTERS = ("steps", "output_tokens", "forward_seconds", "step_seconds", "preemptions", "prompt_tokens_computed",
             "prefix_cache_queries", "prefix_cache_hits",
             # Under tensor parallelism: the forward's time split (rank 0's compute and collectives, the driver's
             # step broadcasts) and the bytes rank 0 all-reduced or gathered.
             "tp_steps", "tp_compute_seconds", "tp_collective_seconds", "tp_broadcast_seconds", "tp_collective_bytes")


async def _sample_pool(engine: Engine, ids: list[str], start: float, interval: float, trace: dict) -> None:
    """Every `interval` s, record blocks in use, KV waste and each live request's block count.

    Reads the BlockManager directly on the event loop, between actor turns: a
    stats() round trip would wait behind the forward and sample unevenly.
    """
    index = {rid: i for i, rid in enumerate(ids)}
    while True:
        usage = engine.blocks.usage()
        row = [0] * len(ids)
        for rid, n in usage.items():
            if rid in index:
                row[index[rid]] = n
        trace["t"].append(time.perf_counter() - start)
        trace["blocks_used"].append(engine.blocks.num_used)
        trace["kv_waste"].append(engine.blocks.kv_waste())
        trace["per_request"].append(row)
        await asyncio.sleep(interval)


async def _one(engine: Engine, timing: Timing, prompt: list[int], start: float) -> None:
    await asyncio.sleep(max(0.0, start + timing.arrival - time.perf_counter()))
    params = SamplingParams(max_tokens=timing.output_len, temperature=0, ignore_eos=True)
    async for out in engine.generate(prompt, params, request_id=timing.request_id):
        if out.token_ids:
            timing.token(time.perf_counter() - start, len(out.token_ids))
        if out.error:
            raise RuntimeError(f"kvmux request {timing.request_id} failed: {out.error}")


async def _in_process(engine: Engine, job: Job, begin) -> list[Timing]:
    timings = [Timing(r.request_id, r.arrival, len(r.prompt_ids), r.output_len) for r in job.requests]
    start = begin()
    await asyncio.gather(*(_one(engine, t, r.prompt_ids, start) for t, r in zip(timings, job.requests)))
    return timings


async def _over_http(engine: Engine, job: Job, begin) -> list[Timing]:
    from kvmux.serve.http import HttpOptions, HttpServer  # only this run pays for importing the HTTP stack

    server = HttpServer(engine, HttpOptions(port=0))
    await server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="kvmux-http-load-") as scratch:
            job_path, out_path = Path(scratch) / "job.json", Path(scratch) / "timings.json"
            replace(job, options={}).save(job_path)
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.http_load", f"http://127.0.0.1:{server.port}/v1", str(job_path),
                str(out_path), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
            if (await client.stdout.readline()).strip() == b"start":  # its warm-up is done: the clocks start
                begin()
            if await client.wait() != 0:
                raise RuntimeError(f"the HTTP load client failed with status {client.returncode}")
            return [Timing(**t) for t in json.loads(out_path.read_text())]
    finally:
        await server.shutdown()


async def _run(job: Job) -> dict:
    opts = job.options
    # The pool holds the whole workload at once, the same sizing rule hf-cb gets, so peak memory compares like
    # for like; the slack covers the admission watermark.
    num_blocks = sum(-(-(len(r.prompt_ids) + r.output_len) // BLOCK_SIZE) for r in job.requests) + 64
    async with Engine(job.model, dtype=job.dtype, quantization=opts.get("quantization", "auto"),
                      block_size=BLOCK_SIZE, num_blocks=num_blocks,
                      max_num_seqs=opts.get("max_num_seqs", 64),
                      max_num_batched_tokens=opts.get("max_num_batched_tokens", 512),
                      tensor_parallel_size=opts.get("tensor_parallel_size", 1), threads=opts.get("threads"),
                      **({"num_scheduler_steps": opts["num_scheduler_steps"]} if "num_scheduler_steps" in opts else {})
                      ) as engine:
        # Warm-up: first-call costs stay out of the timed run. Its prompt is reversed so that no request of the
        # workload finds it in the prefix cache.
        await engine.complete(job.requests[0].prompt_ids[:16][::-1], SamplingParams(max_tokens=4, temperature=0))
        before = await engine.stats()
        trace = {"t": [], "blocks_used": [], "kv_waste": [], "per_request": []}
        samplers = []

        def begin() -> float:
            """The timed run starts: the clock and the pool sampler."""
            start = time.perf_counter()
            engine.blocks.reset_peak()
            samplers.append(asyncio.create_task(_sample_pool(engine, [r.request_id for r in job.requests], start,
                                                             opts.get("sample_interval", SAMPLE_INTERVAL_S), trace)))
            return start

        play = _over_http if opts.get("transport") == "http" else _in_process
        own, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        try:
            timings = await play(engine, job, begin)
        finally:
            for sampler in samplers:
                sampler.cancel()
        wall = max(t.last for t in timings)
        after = await engine.stats()
        result = summarize(timings, wall, latency=True)
        result["kvmux"] = _engine_metrics(before, after, trace, engine.blocks.num_blocks, engine.blocks.peak_used)
        # Where the CPU went, to tell the HTTP front's cost from its client's: both share the machine's cores.
        result["cpu_seconds"] = {"engine_process": _cpu(resource.RUSAGE_SELF) - own,
                                 "client_process": _cpu(resource.RUSAGE_CHILDREN) - children}
    return result


def _cpu(who: int) -> float:
    """CPU seconds, user and system: of this process (RUSAGE_SELF; not a tensor-parallel engine's ranks) or of
    its ended children (the HTTP client, its whole life)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _engine_metrics(before: dict, after: dict, trace: dict, blocks_total: int, peak_blocks_used: int) -> dict:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in _COUNTERS}
    busy = [w for w, used in zip(trace["kv_waste"], trace["blocks_used"]) if used]
    return {
        **delta,
        "blocks_total": blocks_total,
        # The block manager's high-water mark: the trace's samples, 20 ms apart, can miss a short run's peak.
        "peak_blocks_used": peak_blocks_used,
        # Samples are evenly spaced in time, so their mean is the time average (over time the pool holds anything).
        "kv_waste_time_avg": sum(busy) / len(busy) if busy else 0.0,
        # Prompt tokens served from cached prefix blocks ÷ prompt tokens looked up (the block manager's counters).
        "prefix_hit_rate": (delta["prefix_cache_hits"] / delta["prefix_cache_queries"]
                            if delta["prefix_cache_queries"] else 0.0),
        # Time in a step outside the model forward: scheduling, actor messages, sampling, detokenizing.
        "step_overhead_share": 1 - delta["forward_seconds"] / delta["step_seconds"] if delta["step_seconds"] else 0.0,
        "trace": _thin(trace, MAX_TRACE_SAMPLES),
    }


def _thin(trace: dict, limit: int) -> dict:
    """Every k-th sample, so a long run's trace stays a few hundred KB; the averages above use all samples."""
    step = max(1, -(-len(trace["t"]) // limit))
    return {key: values[::step] for key, values in trace.items()}


def run(job: Job) -> dict:
    return asyncio.run(_run(job))
