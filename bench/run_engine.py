"""One engine, one job, in its own process: `python -m bench.run_engine JOB.json RESULT.json`.

A process per engine keeps each one's peak RSS its own and stops one engine's
threads and allocator caches from slowing the next.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

from bench.job import Job
from bench.metrics import peak_rss_mib

RUNNERS = {"kvmux": "bench.engines.kvmux_engine", "hf-static": "bench.engines.hf_static",
           "hf-cb": "bench.engines.hf_cb", "llama-cpp": "bench.engines.llama_cpp"}


def main(job_path: str, result_path: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    job = Job.load(Path(job_path))
    result = importlib.import_module(RUNNERS[job.engine]).run(job)
    result.update(engine=job.engine, label=job.label, mode=job.mode, dtype=job.dtype, options=job.options,
                  peak_rss_mib=peak_rss_mib(), torch_threads=torch.get_num_threads())
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
