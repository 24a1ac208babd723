"""The short soak: bench/soak.py drives a real `kvmux serve` process on a tiny model with every kind of client
for a few seconds; nothing may leak, hang, fail unexpectedly or grow the server's memory past its bound, and
SIGTERM while a client reads nothing ends the server within its bound (all among summary["passed"]'s checks)."""
from __future__ import annotations

import asyncio

from bench.soak import SoakConfig, run

from tiny_model import make_tiny_model


def test_short_soak(tmp_path):
    model = str(make_tiny_model(tmp_path / "m"))
    cfg = SoakConfig(model=model, duration=8, warmup=3, clients=6, max_tokens=16, num_blocks=40, block_size=8,
                     max_model_len=256, max_prompt_tokens=200, max_pending=24, grace_period=1, drain_timeout=1,
                     out=None)
    summary = asyncio.run(run(cfg))
    # The failed checks and the first problems first: pytest cuts a long summary short.
    assert summary["passed"], (summary["failed_checks"], summary["problem_samples"][:5], summary)
    assert summary["leaks_found"] == 0 and summary["hangs"] == 0 and summary["problems"] == 0
    assert summary["completed"] > 50 and summary["aborted_or_disconnected"] > 0
    # The mix reached preemption, the per-connection limit and the prompt limit.
    assert summary["server_stats"]["preemptions"] > 0
    assert {"too_many_requests", "prompt_too_long"} <= set(summary["errors_by_code"])
