"""Check and time every CPU kernel variant this host runs; name the ones it cannot, and why.

    python -m bench.cpu_check                 # every check in kernel_checks.CHECKS, all cores
    python -m bench.cpu_check --threads 2
    python -m bench.cpu_check --only linear/  # the checks whose name contains it

Each variant runs on fresh random inputs against its float64 reference
(kvmux/checks/kernels.py: the same trials the suite runs), then is timed
against torch on the same inputs (F.linear in the weight's dtype; the torch
paged-attention reference), alternating, median of repeated calls. A variant
needing an instruction set this CPU lacks is skipped and listed with it (the
next host that has it runs it). Writes bench/results/cpu_check.json; exits 1
if any variant is off its reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.__main__ import cpu_flags
from bench.attention import time_ms
from kvmux.checks.kernels import CHECKS
from kvmux.ops import kernel_choice
from kvmux.ops.threads import set_threads

RESULTS = Path(__file__).resolve().parent / "results"


def run_check(check, seed: int, min_time: float) -> dict:
    trials = []
    for trial in check.trials(check.variant, check.fmt, seed):
        result = trial.check()
        kernel = time_ms(trial.run, min_time=min_time, min_runs=3)
        baseline = time_ms(trial.baseline, min_time=min_time, min_runs=3)
        trials.append(dict(shape=trial.label, **result, kernel_ms=kernel, torch_ms=baseline, speedup=baseline / kernel))
        mark = "ok" if result["ok"] else "FAILED"
        print(f"  {trial.label:36s} {mark:6s} error {result['max_error']:9.2e} ({result['error_vs_bound']:5.2f} of "
              f"bound)  {kernel:8.3f} ms vs torch {baseline:8.3f} ms  x{baseline / kernel:5.2f}", flush=True)
    return dict(check=check.name, op=check.op, variant=check.variant, format=check.fmt,
                ok=all(t["ok"] for t in trials), trials=trials)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="threads of torch and of kvmux's kernels [default: all cores]")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per kernel and trial")
    p.add_argument("--only", default="", help="run only the checks whose name (op/variant/format) contains this")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # torch's side of the comparisons
    set_threads(threads)  # kvmux's kernels
    features = kernel_choice.cpu_features()
    print(f"CPU flags: {' '.join(cpu_flags())}\nkernels may use: {' '.join(k for k, v in features.items() if v)}")
    checked, skipped = [], []
    for check in (c for c in CHECKS if args.only in c.name):
        missing = check.missing()
        if missing:
            skipped.append(dict(check=check.name, needs=missing))
            print(f"{check.name}: skipped, needs {', '.join(missing)}", flush=True)
            continue
        print(f"{check.name}:", flush=True)
        checked.append(run_check(check, args.seed, args.min_time))
    failed = [c["check"] for c in checked if not c["ok"]]
    result = dict(command="python -m bench.cpu_check", created=time.strftime("%Y-%m-%d %H:%M:%S"),
                  machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=threads,
                  torch=torch.__version__, cpu_flags=cpu_flags(), cpu_features=features, checked=checked,
                  skipped=skipped, failed=failed, loadavg_at_end=os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cpu_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(checked)} variants checked, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{len(skipped)} skipped for lack of an instruction set; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
