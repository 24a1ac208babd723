"""Peak resident memory of `kvmux generate` on a model file, weights included (issue 26: Gemma 3's file <= 600 MB).

    python -m bench.peak_rss --model gemma-3-270m-q4_k_m.gguf --runs 3

Each run is `kvmux generate --raw --model FILE PROMPT --temperature 0 --max-tokens N` in a process of its own; its
peak is the kernel's count for that child (ru_maxrss of RUSAGE_CHILDREN after each, the VmHWM `/usr/bin/time -v`
prints), so nothing of this process is in it. Writes bench/results/peak_rss_<file>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.__main__ import cpu_flags

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MB = 600


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .gguf file or safetensors folder")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    command = ["generate", "--raw", "--model", args.model, args.prompt, "--temperature", "0",
               "--max-tokens", str(args.max_tokens)]
    peaks = []
    for _ in range(args.runs):
        # A child of a fresh interpreter per run, whose own children's peak is that run's alone.
        probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                 "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "kvmux", *command], check=True,
                             capture_output=True, text=True).stdout
        peaks.append(int(out.split()[-1]))
        print(f"kvmux {' '.join(command)}: peak RSS {peaks[-1]:,} kB", flush=True)
    name = Path(args.model).name.removesuffix(".gguf")
    result = dict(command="python -m bench.peak_rss " + " ".join(sys.argv[1:] if argv is None else argv),
                  kvmux_command="kvmux " + " ".join(command), cpu_flags=cpu_flags(), peak_rss_kb=peaks,
                  target_mb=TARGET_MB, met=max(peaks) <= TARGET_MB * 1000, loadavg=os.getloadavg(),
                  created=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peak_rss_{name}.json"
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"), name)
    print(f"wrote {path} and .png", flush=True)


def plot(result: dict, path: Path, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    mb = [kb / 1000 for kb in result["peak_rss_kb"]]
    ax.bar([f"run {i + 1}" for i in range(len(mb))], mb, color="tab:blue")
    ax.axhline(result["target_mb"], color="tab:red", linestyle="--", label=f"target {result['target_mb']} MB")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title(f"kvmux generate, {name}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
