"""transformers' own continuous batching: ContinuousBatchingManager over its paged cache, per-request output
lengths, streamed results (so its time to first token is measured too)."""
from __future__ import annotations

import math
import time

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from bench.engines.hf_common import load
from bench.job import Job
from bench.metrics import Timing, summarize

PAGE_SIZE = 256  # transformers' default page size


def _manager(model, job: Job):
    opts = job.options
    # Pool sized so that every request of the workload fits at once (no eviction), with the same per-step token
    # and sequence limits kvmux runs under. Left unset, the pool is sized from a share of host RAM (gigabytes).
    pages = sum(math.ceil((len(r.prompt_ids) + r.output_len) / PAGE_SIZE) for r in job.requests) + 2
    cb_config = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=pages,
                                         max_batch_tokens=opts.get("max_num_batched_tokens", 512),
                                         max_requests_per_batch=opts.get("max_num_seqs", 64))
    # eos_token_id=-1 disables stopping on EOS, so each request runs to exactly its max_new_tokens.
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=model.config.pad_token_id or 0,
                                  max_new_tokens=max(r.output_len for r in job.requests))
    return model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)


def _drain(manager, timings: dict[str, Timing], start: float, until: float | None) -> int:
    """Collect streamed results until `until` (perf_counter time) or until one arrives if None; returns finished."""
    finished = 0
    while True:
        timeout = 0.5 if until is None else until - time.perf_counter()
        if timeout <= 0:
            return finished
        result = manager.get_result(timeout=timeout)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped unexpectedly")
            continue
        if result.error:
            raise RuntimeError(f"hf-cb request {result.request_id} failed: {result.error}")
        t = timings[result.request_id]
        # Streamed outputs carry the tokens so far; count the growth.
        grown = len(result.generated_tokens) - t.produced
        if grown > 0:
            t.token(time.perf_counter() - start, grown)
        finished += result.is_finished()
        if until is None:
            return finished


def run(job: Job) -> dict:
    model = load(job.hf_folder, job.dtype)
    manager = _manager(model, job)
    with torch.inference_mode():
        manager.start()
        try:
            warm = {"warmup": Timing("warmup", 0.0, 16, 4)}
            # Reversed, so no request of the workload finds the warm-up prompt among its shared blocks.
            manager.add_request(job.requests[0].prompt_ids[:16][::-1], request_id="warmup", max_new_tokens=4,
                                streaming=True)
            while not _drain(manager, warm, time.perf_counter(), None):
                pass
            timings = {r.request_id: Timing(r.request_id, r.arrival, len(r.prompt_ids), r.output_len)
                       for r in job.requests}
            start = time.perf_counter()
            done = 0
            # Streaming costs a result per token per step, so only the online run (which needs TTFT) pays it.
            streaming = job.mode == "online"
            for r in sorted(job.requests, key=lambda r: r.arrival):
                done += _drain(manager, timings, start, start + r.arrival)
                manager.add_request(r.prompt_ids, request_id=r.request_id, max_new_tokens=r.output_len,
                                    streaming=streaming)
            while done < len(timings):
                done += _drain(manager, timings, start, None)
        finally:
            manager.stop(block=True)
    ordered = [timings[r.request_id] for r in job.requests]
    return summarize(ordered, max(t.last for t in ordered), latency=job.mode == "online")
