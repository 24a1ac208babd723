"""`python -m bench` (also `kvmux bench`): run every engine on one workload and write JSON + PNG results.

Each engine runs in its own subprocess (bench.run_engine); this process only
draws the workload, collects the results, and writes the report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.job import Job
from bench.workload import WorkloadSpec, describe, distribution_means, make_workload
from kvmux.cli.main import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("kvmux", "hf-static", "hf-cb")  # the default set
PEERS = ("llama-cpp",)  # optional engines (the `peers` extra): --engines kvmux,llama-cpp
ONLINE_ENGINES = ("kvmux", "hf-cb", "llama-cpp")  # a static batch cannot take arrivals: hf-static is offline only
# Issue 7's speed targets: kvmux output throughput vs. the best static batch and vs. transformers' CB; issue 15's
# vs. llama.cpp on the same GGUF (kvmux keeping its quantized blocks).
TARGETS = {"vs_static_best": 5.0, "vs_hf_cb": 3.0}
# Issue 14's: what the HTTP front may cost against the in-process API on the same workload.
HTTP_TARGETS = {"ttft_p50_cost_max": 0.05, "throughput_cost_max": 0.02}
TARGET_VS_LLAMA_CPP = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvmux bench", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small run (about a minute on a quiet machine): 16 requests, prompts <= 256 and outputs <= 32 "
                        "tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="float32",
                   help="weights and KV dtype of every engine (both: one run each)")
    p.add_argument("--quantization", choices=("auto", "none", "q8_0"), default="auto",
                   help="kvmux's --quantization: auto keeps a GGUF's quantized blocks (the default model's Q4_1), "
                        "none dequantizes to --dtype")
    p.add_argument("--requests", type=int, default=None, help="number of requests [default: 64; --quick: 16]")
    p.add_argument("--mode", choices=("offline", "online", "both"), default="offline",
                   help="offline: all requests at once (throughput); online: Poisson arrivals at --rate (latency)")
    p.add_argument("--rate", type=float, default=1.0, help="online arrival rate, requests/s")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated, from %(default)s and {', '.join(PEERS)} (llama-cpp-python: pip install "
                        f"-e '.[peers]'; it runs the GGUF itself, the default model's Q4_1 file without --model)")
    p.add_argument("--transport", choices=("api", "http"), default="api",
                   help="api: kvmux through its asyncio API; http: also through its HTTP server (OpenAI API) with "
                        "a client in another process, as kvmux-http, to compare the two")
    p.add_argument("--static-batch-sizes", default="8,32", help="hf-static batch sizes")
    p.add_argument("--shared-prefix", action="store_true",
                   help="every prompt starts with one shared --prefix-len token prefix, then a distinct suffix")
    p.add_argument("--prefix-len", type=int, default=256, help="tokens of the shared prefix")
    p.add_argument("--model", default=None,
                   help="safetensors folder or .gguf file [default: SmolLM2-135M-Instruct's Q4_1 GGUF]")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload draw")
    p.add_argument("--max-prompt-len", type=int, default=None, help="upper clip of prompt lengths [default: 512; --quick: 256]")
    p.add_argument("--max-output-len", type=int, default=None,
                   help="upper clip of output lengths [default: 256; --quick: 32]")
    p.add_argument("--max-num-seqs", type=int, default=64, help="concurrent sequences, kvmux and hf-cb")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="kvmux's model ranks (each a process with cores / ranks threads)")
    p.add_argument("--kvmux-threads", type=int, default=None,
                   help="kvmux's kernel threads [default: the CPUs it may use]; with --transport http on a small machine, fewer "
                        "leave the HTTP client cores of its own, so the comparison shows the front, not the contention")
    p.add_argument("--num-scheduler-steps", type=int, default=None,
                   help="kvmux's forwards per decode step while nothing waits for prefill [default: the engine's]")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step, kvmux and hf-cb [default: offline 2048 (whole prompts per step, for "
                        "throughput), online 512 (short steps, for time per output token)]")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="results folder, relative to the current one (bench/results holds the committed numbers)")
    args = p.parse_args(argv)
    # The engines run in subprocesses of their own: paths are made absolute against the caller's folder.
    args.out = args.out.resolve()
    if args.model is not None:
        args.model = str(Path(args.model).expanduser().resolve())
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES) - set(PEERS)
    if unknown:
        p.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES + PEERS)}")
    return args


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    spec = WorkloadSpec(num_requests=args.requests or (16 if args.quick else 64), seed=args.seed,
                        shared_prefix_len=args.prefix_len if args.shared_prefix else 0)
    prompt_max = args.max_prompt_len or (256 if args.quick else spec.prompt_clip[1])
    output_max = args.max_output_len or (32 if args.quick else spec.output_clip[1])
    return replace(spec, prompt_clip=(min(spec.prompt_clip[0], prompt_max), prompt_max),
                   output_clip=(min(spec.output_clip[0], output_max), output_max))


def hf_folder(model: str | None) -> str:
    """The weights as a transformers folder: a GGUF (the default model's, without --model) dequantized."""
    from kvmux.model.loader import convert_gguf, default_model_path

    if model is None or model.endswith(".gguf"):
        return str(convert_gguf(Path(model) if model else default_model_path()))
    return model


def vocabulary(folder: str) -> tuple[int, set[int]]:
    """Vocabulary size and the ids a prompt must not contain (special and added tokens)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    return min(len(tok), AutoConfig.from_pretrained(folder).vocab_size), special


DEFAULT_STEP_TOKENS = {"offline": 2048, "online": 512}


def plan(args, dtype: str, folder: str, offline, online) -> list[Job]:
    jobs = []
    for mode, requests in (("offline", offline), ("online", online)):
        if requests is None:
            continue
        engine_opts = {"max_num_seqs": args.max_num_seqs, "tensor_parallel_size": args.tensor_parallel_size,
                       "max_num_batched_tokens": args.max_num_batched_tokens or DEFAULT_STEP_TOKENS[mode]}
        kvmux_opts = {**engine_opts, "quantization": args.quantization, "threads": args.kvmux_threads,
                      **({"num_scheduler_steps": args.num_scheduler_steps} if args.num_scheduler_steps else {})}
        for engine in args.engines:
            if engine == "hf-static":
                if mode == "offline":
                    jobs += [Job(engine, f"hf-static-b{b}", mode, dtype, args.model, folder, requests,
                                 {"batch_size": b}) for b in map(int, args.static_batch_sizes.split(","))]
            elif mode == "offline" or engine in ONLINE_ENGINES:
                opts = kvmux_opts if engine == "kvmux" else engine_opts
                jobs.append(Job(engine, engine, mode, dtype, args.model, folder, requests, dict(opts)))
                if engine == "kvmux" and args.transport == "http":
                    jobs.append(Job(engine, "kvmux-http", mode, dtype, args.model, folder, requests,
                                    {**opts, "transport": "http"}))
    return jobs


def run_job(job: Job, scratch: Path) -> dict:
    job_path, result_path = scratch / f"{job.label}-{job.mode}.job.json", scratch / f"{job.label}-{job.mode}.json"
    job.save(job_path)
    print(f"  {job.label:<16} {job.mode:<8}", end="", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.run_engine", str(job_path), str(result_path)], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"FAILED after {elapsed:.0f} s")
        # A crash (a signal: negative status) may leave no message, so the status is recorded too.
        return {"engine": job.engine, "label": job.label, "mode": job.mode,
                "error": f"exit status {proc.returncode}\n{proc.stderr[-4000:]}"}
    result = json.loads(result_path.read_text())
    print(f"{result['output_tok_s']:8.1f} out tok/s  ({elapsed:.0f} s incl. load)", flush=True)
    return result


def summarize_runs(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    offline = {r["label"]: r["output_tok_s"] for r in ok if r["mode"] == "offline"}
    static = {k: v for k, v in offline.items() if k.startswith("hf-static")}
    summary = {"offline_output_tok_s": offline, "failed": [f"{r['label']} ({r['mode']})" for r in runs if "error" in r],
               "lengths_exact": {f"{r['label']} ({r['mode']})": r["lengths_exact"] for r in ok}}
    kvmux = offline.get("kvmux")
    if kvmux and static:
        best = max(static, key=static.get)
        summary.update(static_best=best, kvmux_vs_static_best=kvmux / static[best])
    if kvmux and "hf-cb" in offline:
        summary["kvmux_vs_hf_cb"] = kvmux / offline["hf-cb"]
    if "kvmux_vs_static_best" in summary and "kvmux_vs_hf_cb" in summary:
        summary["targets"] = TARGETS
        summary["targets_met"] = (summary["kvmux_vs_static_best"] >= TARGETS["vs_static_best"]
                                  and summary["kvmux_vs_hf_cb"] >= TARGETS["vs_hf_cb"])
    http = {}
    for mode in ("offline", "online"):
        api = next((r for r in ok if r["label"] == "kvmux" and r["mode"] == mode), None)
        front = next((r for r in ok if r["label"] == "kvmux-http" and r["mode"] == mode), None)
        if api and front:
            http[mode] = {"throughput_cost": 1 - front["output_tok_s"] / api["output_tok_s"]}
            if api.get("ttft_s"):
                http[mode]["ttft_p50_cost"] = front["ttft_s"]["p50"] / api["ttft_s"]["p50"] - 1
            http[mode]["targets_met"] = (http[mode]["throughput_cost"] <= HTTP_TARGETS["throughput_cost_max"]
                                         and http[mode].get("ttft_p50_cost", 0) <= HTTP_TARGETS["ttft_p50_cost_max"])
            # The engine process's extra CPU over HTTP is the front's own cost; the client's is the load's.
            http[mode]["cpu_seconds"] = {"api_engine": api["cpu_seconds"]["engine_process"],
                                         "http_engine": front["cpu_seconds"]["engine_process"],
                                         "http_client": front["cpu_seconds"]["client_process"]}
    if http:
        summary["http_vs_api"] = {**http, "targets": HTTP_TARGETS}
    if kvmux and "llama-cpp" in offline:
        summary["kvmux_vs_llama_cpp"] = kvmux / offline["llama-cpp"]
        summary["target_vs_llama_cpp"] = TARGET_VS_LLAMA_CPP
    return summary


def machine() -> dict:
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "load_avg_at_start": os.getloadavg()}


def cpu_flags() -> list[str]:
    """The vector instruction sets this CPU has, as /proc/cpuinfo names them (recorded with every result)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx")))


def print_table(results: dict) -> None:
    print(f"\n{'engine':<16} {'mode':<8} {'out tok/s':>10} {'tot tok/s':>10} {'req/s':>7} {'TTFT p50':>9} "
          f"{'TPOT p50':>9} {'peak RSS':>9}")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['label']:<16} {r['mode']:<8} FAILED")
            continue
        ttft = f"{r['ttft_s']['p50'] * 1000:7.0f}ms" if r.get("ttft_s") else "       -"
        tpot = f"{r['tpot_s']['p50'] * 1000:7.1f}ms" if r.get("tpot_s") else "       -"
        print(f"{r['label']:<16} {r['mode']:<8} {r['output_tok_s']:10.1f} {r['total_tok_s']:10.1f} "
              f"{r['requests_s']:7.2f} {ttft:>9} {tpot:>9} {r['peak_rss_mib']:7.0f}MB")
    s = results["summary"]
    for key in ("kvmux_vs_static_best", "kvmux_vs_hf_cb", "kvmux_vs_llama_cpp"):
        if key in s:
            print(f"{key}: {s[key]:.2f}x")
    for mode, cost in s.get("http_vs_api", {}).items():
        if mode != "targets":
            cpu = cost["cpu_seconds"]
            print(f"HTTP vs API ({mode}): throughput cost {100 * cost['throughput_cost']:+.1f}%"
                  + (f", TTFT p50 cost {100 * cost['ttft_p50_cost']:+.1f}%" if "ttft_p50_cost" in cost else "")
                  + f"; CPU s: engine process {cpu['api_engine']:.1f} (API) / {cpu['http_engine']:.1f} (HTTP), "
                    f"HTTP client {cpu['http_client']:.1f}")


def run_dtype(args, dtype: str, folder: str, spec: WorkloadSpec, vocab: tuple[int, set[int]]) -> Path:
    offline = make_workload(spec, *vocab) if args.mode in ("offline", "both") else None
    online = make_workload(replace(spec, rate=args.rate), *vocab) if args.mode in ("online", "both") else None
    print(f"kvmux bench: {dtype}, {spec.num_requests} requests, mode {args.mode}")
    with tempfile.TemporaryDirectory(prefix="kvmux-bench-") as scratch:
        runs = [run_job(job, Path(scratch)) for job in plan(args, dtype, folder, offline, online)]
    drawn = describe(offline or online)
    results = {
        "command": " ".join(["kvmux", "bench", *map(shlex.quote, args.argv)]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "model": args.model or "SmolLM2-135M-Instruct",
        "dtype": dtype,
        "kvmux_quantization": args.quantization,
        "cpu_flags": cpu_flags(),
        "workload": {"spec": spec.to_dict(), "distribution": distribution_means(spec), "drawn": drawn,
                     "modes": args.mode, "rate": args.rate if online else None,
                     "greedy": True, "ignore_eos": True},
        "runs": runs,
        "summary": summarize_runs(runs),
        "notes": ["hf-static runs offline only: a static batch cannot admit arrivals, so it has no online latency.",
                  "hf-static output tokens count each request's own length; a batch runs to its longest output "
                  "(generated_tokens_incl_padding is the work actually done).",
                  "hf-cb streams results only in the online mode (streaming costs it a result per token).",
                  "llama-cpp runs the GGUF file itself (the default model's own Q4_1 file), batched greedy sequences "
                  "in one unified KV cache, with the same threads, sequences and step budget as kvmux; kvmux runs "
                  "with --quantization as recorded in kvmux_quantization."],
    }
    tp = f"_tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    threads = f"_threads{args.kvmux_threads}" if args.kvmux_threads else ""
    steps = f"_steps{args.num_scheduler_steps}" if args.num_scheduler_steps else ""
    suffix = ("" if args.quantization == "auto" else f"_{args.quantization}") + \
        ("_shared" if args.shared_prefix else "") + tp + threads + steps + ("_http" if args.transport == "http" else "") + \
        ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_{dtype}{suffix}.json"
    path.write_text(json.dumps(results, indent=1))
    from bench.plot import plot

    plot(results, path.with_suffix(".png"))
    print_table(results)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    folder = hf_folder(args.model)
    spec = workload_spec(args)
    vocab = vocabulary(folder)
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    paths = [run_dtype(args, dtype, folder, spec, vocab) for dtype in dtypes]
    failed = any(json.loads(p.read_text())["summary"]["failed"] for p in paths)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
