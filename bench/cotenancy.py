"""Speed beside a busy neighbour: kvmux bench quiet, then with one CPU kept busy by another process, and in a
cgroup limited to one CPU, in one run.

    python -m bench.cotenancy            # 16 requests (offline and online) and 64 (offline), each quiet and busy
    python -m bench.cotenancy --quick    # 16 requests, offline only

The neighbour is `python3 -c "while 1: pass"` pinned to the last CPU of this process's affinity mask (as
`taskset -c 1` on a 2-core machine), started before a case and killed after it; kvmux is not pinned. Quiet and
busy cases alternate, and each is a `python -m bench --engines kvmux[,llama-cpp]` subprocess (llama.cpp beside
kvmux when the `peers` extra is installed). Reported: each busy throughput as a share of the quiet one of the
same engine and size, and the online time per output token p50 busy over quiet.

The quota case needs to create a cgroup (root, a writable cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`): a
bench with default settings runs inside one limited to one CPU (100000 of every 100000 us), against `--threads 1`
outside it. Where no cgroup can be made it is skipped with the reason. Writes bench/results/cotenancy.json and
cotenancy.png.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"busy_throughput_share_min": 0.45, "busy_tpot_p50_ratio_max": 2.5, "quota_vs_one_thread_min": 0.90}
CGROUP = "kvmux-cotenancy"


@contextlib.contextmanager
def neighbour():
    """A busy process on the last CPU this process may use."""
    cpu = max(os.sched_getaffinity(0))
    hog = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while 1: pass"])
    try:
        yield cpu
    finally:
        hog.kill()
        hog.wait()


def quota_cgroup() -> tuple[Path | None, str]:
    """A cgroup limited to one CPU, made for this run: (the file a pid is written to, '') or (None, why not)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    try:
        if v2.exists():
            folder = Path("/sys/fs/cgroup") / CGROUP
            folder.mkdir(exist_ok=True)
            (folder / "cpu.max").write_text("100000 100000\n")
            return folder / "cgroup.procs", ""
        folder = Path("/sys/fs/cgroup/cpu") / CGROUP
        folder.mkdir(exist_ok=True)
        (folder / "cpu.cfs_period_us").write_text("100000\n")
        (folder / "cpu.cfs_quota_us").write_text("100000\n")
        return folder / "cgroup.procs", ""
    except OSError as e:
        return None, f"cannot create a CPU-limited cgroup here ({e}); run as root on a host with the cpu controller"


def run_bench(label: str, args: list[str], cgroup: Path | None = None) -> dict:
    """One `python -m bench` run; its report, with the load average before it started."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "bench", "--out", out, *args]
        enter = (lambda: cgroup.write_text(str(os.getpid()))) if cgroup else None
        load = os.getloadavg()
        print(f"[{label}] {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=ROOT, check=True, preexec_fn=enter, stdout=subprocess.DEVNULL)
        report = json.loads(next(Path(out).glob("bench_*.json")).read_text())
    return {"label": label, "args": args, "load_avg_before": load,
            "runs": [{k: r.get(k) for k in ("engine", "label", "mode", "output_tok_s", "tpot_s", "ttft_s")}
                     for r in report["runs"] if "output_tok_s" in r]}


def pick(case: dict, engine: str, mode: str) -> dict | None:
    return next((r for r in case["runs"] if r["label"] == engine and r["mode"] == mode), None)


def compare(quiet: dict, busy: dict, engines: list[str]) -> dict:
    out = {}
    for engine in engines:
        for mode in ("offline", "online"):
            q, b = pick(quiet, engine, mode), pick(busy, engine, mode)
            if not (q and b):
                continue
            entry = {"quiet_out_tok_s": q["output_tok_s"], "busy_out_tok_s": b["output_tok_s"],
                     "busy_share": b["output_tok_s"] / q["output_tok_s"]}
            if mode == "online":
                entry |= {"quiet_tpot_p50_ms": q["tpot_s"]["p50"] * 1e3, "busy_tpot_p50_ms": b["tpot_s"]["p50"] * 1e3,
                          "tpot_p50_ratio": b["tpot_s"]["p50"] / q["tpot_s"]["p50"]}
            out[f"{engine} {mode}"] = entry
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{n} req, {name}", c) for n, cases in report["sizes"].items() for name, c in cases["compare"].items()]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(len(rows), 1)))
    ax.barh([r[0] for r in rows], [r[1]["busy_share"] for r in rows], color="#3a7")
    ax.axvline(TARGETS["busy_throughput_share_min"], color="#c33", linestyle="--", label="target 45%")
    if report.get("quota") and "ratio" in report["quota"]:
        ax.barh(["1-CPU quota vs --threads 1"], [report["quota"]["ratio"]], color="#37a")
    ax.set_xlabel("throughput share of the quiet run (one of two CPUs busy)")
    ax.set_xlim(0, 1.1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 requests, offline only")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args()
    engines = ["kvmux"] + (["llama-cpp"] if importlib.util.find_spec("llama_cpp") else [])
    sizes = {16: "offline" if args.quick else "both"} | ({} if args.quick else {64: "offline"})
    report = {"command": "python -m bench.cotenancy" + (" --quick" if args.quick else ""),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "engines": engines,
              "cpu_flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                   if f.startswith(("avx", "amx"))}),
              "cpus": len(os.sched_getaffinity(0)), "targets": TARGETS, "sizes": {}}
    for n, mode in sizes.items():
        bench_args = ["--engines", ",".join(engines), "--requests", str(n), "--mode", mode]
        quiet = run_bench(f"quiet {n}", bench_args)
        with neighbour() as cpu:
            busy = run_bench(f"busy {n} (CPU {cpu} taken)", bench_args)
        report["sizes"][n] = {"quiet": quiet, "busy": busy, "compare": compare(quiet, busy, engines)}
    cgroup, why = quota_cgroup()
    if cgroup is None:
        report["quota"] = {"skipped": why}
    else:
        one = ["--engines", "kvmux", "--requests", "16"]
        unlimited = run_bench("--threads 1, no quota", one + ["--kvmux-threads", "1"])
        limited = run_bench("1-CPU quota, default threads", one, cgroup)
        u, lim = pick(unlimited, "kvmux", "offline"), pick(limited, "kvmux", "offline")
        report["quota"] = {"cgroup": str(cgroup.parent), "one_thread_out_tok_s": u["output_tok_s"],
                           "quota_out_tok_s": lim["output_tok_s"], "ratio": lim["output_tok_s"] / u["output_tok_s"]}
        with contextlib.suppress(OSError):  # empty now that the run ended
            cgroup.parent.rmdir()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cotenancy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "cotenancy.png")
    for n, cases in report["sizes"].items():
        for name, c in cases["compare"].items():
            line = f"{n} requests, {name}: quiet {c['quiet_out_tok_s']:.1f}, busy {c['busy_out_tok_s']:.1f} out tok/s " \
                   f"({c['busy_share']:.0%})"
            if "tpot_p50_ratio" in c:
                line += f"; TPOT p50 {c['quiet_tpot_p50_ms']:.1f} -> {c['busy_tpot_p50_ms']:.1f} ms " \
                        f"({c['tpot_p50_ratio']:.2f}x)"
            print(line)
    q = report["quota"]
    print(f"1-CPU quota: {q['quota_out_tok_s']:.1f} vs --threads 1 {q['one_thread_out_tok_s']:.1f} out tok/s "
          f"({q['ratio']:.0%})" if "ratio" in q else f"1-CPU quota: skipped: {q['skipped']}")
    print(f"wrote {args.out / 'cotenancy.json'} and cotenancy.png")


if __name__ == "__main__":
    main()
