"""The client side of `kvmux bench --transport http`: `python -m bench.http_load BASE_URL JOB.json OUT.json`.

A process of its own, as a real client is: it plays the job's requests (same prompts, lengths and arrival
times as the in-process run) against the server with the `openai` SDK, streaming completions, and writes
each request's Timing. It prints "start" once its warm-up request is done, so the server's pool sampler and
this clock start together.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from openai import AsyncOpenAI

from bench.job import Job
from bench.metrics import Timing


async def _one(client: AsyncOpenAI, model: str, timing: Timing, prompt: list[int], start: float) -> None:
    await asyncio.sleep(max(0.0, start + timing.arrival - time.perf_counter()))
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=timing.output_len, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            timing.token(time.perf_counter() - start, 1)
        if chunk.usage is not None:
            # A chunk may carry more than one token (text held back for half a character): count them exactly.
            timing.produced = chunk.usage.completion_tokens


async def _run(base_url: str, job: Job) -> list[Timing]:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    try:
        model = (await client.models.list()).data[0].id
        # Warm-up, reversed so that no request of the workload finds it in the prefix cache (as in-process).
        await client.completions.create(model=model, prompt=job.requests[0].prompt_ids[:16][::-1], max_tokens=4,
                                        temperature=0)
        timings = [Timing(r.request_id, r.arrival, len(r.prompt_ids), r.output_len) for r in job.requests]
        print("start", flush=True)
        start = time.perf_counter()
        await asyncio.gather(*(_one(client, model, t, r.prompt_ids, start) for t, r in zip(timings, job.requests)))
        return timings
    finally:
        await client.close()


def main(base_url: str, job_path: str, out_path: str) -> None:
    timings = asyncio.run(_run(base_url, Job.load(Path(job_path))))
    Path(out_path).write_text(json.dumps([asdict(t) for t in timings]))


if __name__ == "__main__":
    main(*sys.argv[1:])
