"""Per-request timings and the throughput / latency summary computed from them."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass
class Timing:
    """One request, in seconds since the run's start. first/last: when its first/last output token arrived."""

    request_id: str
    arrival: float
    prompt_len: int
    output_len: int  # requested
    produced: int = 0  # output tokens the engine actually delivered for it
    first: float | None = None
    last: float | None = None

    def token(self, now: float, n: int = 1) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.produced += n


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(values))}


def summarize(timings: list[Timing], wall_s: float, latency: bool) -> dict:
    """Throughput over the whole run; latency percentiles when the engine streams (latency=True)."""
    prompt = sum(t.prompt_len for t in timings)
    produced = sum(t.produced for t in timings)
    out = {
        "wall_s": wall_s,
        "requests": len(timings),
        "prompt_tokens": prompt,
        "output_tokens": produced,
        "output_tok_s": produced / wall_s,
        "total_tok_s": (prompt + produced) / wall_s,
        "requests_s": len(timings) / wall_s,
        "lengths_exact": all(t.produced == t.output_len for t in timings),
        "produced": [t.produced for t in timings],
    }
    if latency:
        ttft = [t.first - t.arrival for t in timings if t.first is not None]
        tpot = [(t.last - t.first) / (t.produced - 1) for t in timings if t.produced > 1]
        out["ttft_s"] = percentiles(ttft)
        out["tpot_s"] = percentiles(tpot)
        out["latency_s"] = percentiles([t.last - t.arrival for t in timings if t.last is not None])
        # Raw samples for the CDF plot.
        out["ttft_samples"] = sorted(ttft)
        out["tpot_samples"] = sorted(tpot)
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")
