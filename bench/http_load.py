"""The client side of `kvmux bench --transport http`: `python -m bench.http_load BASE_URL JOB.json OUT.json`.

A process of its own, as a real client is: it plays the job's requests (same prompts, lengths and arrival
times as the in-process run) against the server's OpenAI API, streaming completions, and writes each
request's Timing. It speaks HTTP through aiohttp, as vLLM's serving benchmark does, rather than the openai
SDK: the SDK builds and validates each request in its own process for 3-10 ms at these prompt lengths
(measured against a raw socket client on an idle tiny model: time to first token 5.3-12.3 ms through the
SDK, 2.7-3.3 ms raw, 2.0 in-process), which the comparison would count as the server's. It prints "start"
once its warm-up request is done, so the server's pool sampler and this clock start together.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import aiohttp

from bench.job import Job
from bench.metrics import Timing


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, on_chunk) -> None:
    """POST a streaming completion and call on_chunk with each `data:` event's JSON, up to [DONE]."""
    async with session.post(f"{url}/completions", json={**body, "stream": True}) as response:
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:  # the server ended the stream early and says why
                raise RuntimeError(f"the server ended the stream: {event['error']}")
            on_chunk(event)
    raise RuntimeError("the event stream ended without [DONE]")


async def _one(session: aiohttp.ClientSession, url: str, model: str, timing: Timing, prompt: list[int],
               start: float) -> None:
    await asyncio.sleep(max(0.0, start + timing.arrival - time.perf_counter()))

    def on_chunk(chunk: dict) -> None:
        if chunk["choices"] and chunk["choices"][0]["text"]:
            timing.token(time.perf_counter() - start, 1)
        if chunk.get("usage"):
            # A chunk may carry more than one token (text held back for half a character): count them exactly.
            timing.produced = chunk["usage"]["completion_tokens"]

    await _stream(session, url, {"model": model, "prompt": prompt, "max_tokens": timing.output_len,
                                 "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}},
                  on_chunk)


async def _run(base_url: str, job: Job) -> list[Timing]:
    # As many connections as requests in flight: the default pool of 100 would queue a larger workload.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async with session.get(f"{base_url}/models") as response:
            model = (await response.json())["data"][0]["id"]
        # Warm-up, reversed so that no request of the workload finds it in the prefix cache (as in-process).
        await _stream(session, base_url, {"model": model, "prompt": job.requests[0].prompt_ids[:16][::-1],
                                          "max_tokens": 4, "temperature": 0}, lambda chunk: None)
        timings = [Timing(r.request_id, r.arrival, len(r.prompt_ids), r.output_len) for r in job.requests]
        print("start", flush=True)
        start = time.perf_counter()
        await asyncio.gather(*(_one(session, base_url, model, t, r.prompt_ids, start)
                               for t, r in zip(timings, job.requests)))
        return timings


def main(base_url: str, job_path: str, out_path: str) -> None:
    timings = asyncio.run(_run(base_url, Job.load(Path(job_path))))
    Path(out_path).write_text(json.dumps([asdict(t) for t in timings]))


if __name__ == "__main__":
    main(*sys.argv[1:])
