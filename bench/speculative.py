"""Speculative decoding's gain where outputs repeat their input, and its cost where they do not, in one run.

    python -m bench.speculative            # the default model
    python -m bench.speculative --quick    # fewer rounds, 16 requests for the throughput check

Single stream: four input-grounded chat tasks (copy-edit a function, rewrite a passage, answer from a given
document, fill a JSON template), each alone on the engine, greedy, with speculation off, `ngram` and `suffix`
(each on an engine of its own, alternated over two rounds so none runs only on a quieter machine); output
tokens/s per task, acceptance, and whether the outputs equal those without speculation.

Batch sizes: the copy-edit task N times at once (N = 1, 2, 4, 8, 16), ngram with speculation at every batch
size vs off: where verifying starts to cost more than it saves (what max_batch defaults to).

Throughput: the bench's seeded 64-request workload (kvmux bench's prompts and output lengths), greedy, off vs
ngram with its defaults. Writes bench/results/speculative.json and speculative.png.

    python -m bench.speculative --draft DRAFT [--model TARGET --quantization none]

The single-stream tasks only, off vs ngram vs a draft model (a smaller model with the target's tokenizer), and
per setting the seconds a step's forward and the draft's forwards took: speculative_draft_model.json / .png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.__main__ import cpu_flags, hf_folder, vocabulary
from bench.workload import WorkloadSpec, describe, make_workload
from kvmux import Engine, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"

FUNCTION = '''def summarize(records, key, limit=10):
    totals = {}
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        totals[value] = totals.get(value, 0) + record["amount"]
    ordered = sorted(totals.items(), key=lambda item: item[1], reverse=True)
    result = []
    for name, amount in ordered[:limit]:
        result.append({"name": name, "amount": round(amount, 2)})
    return result
'''

PASSAGE = ("The kernel of the engine is a pool of fixed-size blocks that holds the key and value vectors of every "
           "request. When a request arrives, the scheduler gives it blocks for its prompt; when it generates a "
           "token, it gets one more slot, and a new block only when the last one is full. Requests that share the "
           "start of their prompt share its blocks, so a long system prompt is stored only once. When the pool "
           "runs out, the scheduler moves the blocks of the newest request to host memory and brings them back "
           "later, so that no request has to start over.")

DOCUMENT = ("Release notes, version 2.4. The server now starts in under two seconds on most machines. The cache "
            "folder moved from /var/cache/app to /var/lib/app/cache; the old folder is read once and then removed. "
            "The --workers flag now defaults to the number of CPUs the process may use. Requests larger than 8 MB "
            "are refused with status 413 instead of being cut. The metrics endpoint moved to /metrics and no "
            "longer needs a token. Support for Python 3.8 ended; Python 3.9 or newer is required.")

TEMPLATE = ('{"name": "", "email": "", "company": "", "role": "", "city": "", "country": "", "phone": "", '
            '"newsletter": false, "interests": []}')

TASKS = {
    "copy-edit a function": f"Rename the variable `totals` to `sums` in this Python function and return the whole "
                            f"function:\n\n```python\n{FUNCTION}```",
    "rewrite a passage": f"Repeat this passage word for word, but replace every 'blocks' with 'pages':\n\n{PASSAGE}",
    "answer from a document": f"{DOCUMENT}\n\nQuote, word for word, every sentence of these release notes that "
                              f"mentions a folder or an endpoint.",
    "fill a JSON template": f"Fill in this JSON template for Maria Lopez, maria@example.org, a data engineer at "
                            f"Acme in Lyon, France, phone +33 4 72 00 00 00, who wants the newsletter and likes "
                            f"databases and cycling. Answer with the JSON only.\n\n{TEMPLATE}",
}

METHODS = {"off": None, "ngram": {"method": "ngram"}, "suffix": {"method": "suffix"}}
SPEC_KEYS = ("spec_draft_tokens", "spec_accepted_tokens", "spec_verified_draws", "output_tokens", "steps",
             "forward_seconds", "spec_draft_forwards", "spec_draft_forward_seconds")


async def counters(engine: Engine) -> dict:
    stats = await engine.stats()
    return {k: stats.get(k, 0) for k in SPEC_KEYS}


async def single_stream(model, threads, spec, max_tokens: int, quantization: str = "auto") -> dict:
    """Each task alone, greedy: output tokens/s, the output, and the drafts proposed and accepted."""
    async with Engine(model, threads=threads, speculative_config=spec, quantization=quantization) as engine:
        await engine.complete("Warm up.", SamplingParams(max_tokens=8))
        out = {}
        for name, prompt in TASKS.items():
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            before = await counters(engine)
            started = time.perf_counter()
            done = await engine.complete([{"role": "user", "content": prompt}], params)
            seconds = time.perf_counter() - started
            after = await counters(engine)
            out[name] = {"seconds": seconds, "output_tokens": done.num_output_tokens, "token_ids": done.token_ids,
                         "text": done.text, **{k: after[k] - before[k] for k in SPEC_KEYS}}
        return out


async def batched(model, threads, spec, copies: int, max_tokens: int) -> float:
    """Output tokens/s of `copies` copy-edit requests at once."""
    async with Engine(model, threads=threads, speculative_config=spec) as engine:
        await engine.complete("Warm up.", SamplingParams(max_tokens=8))
        prompt = [{"role": "user", "content": TASKS["copy-edit a function"]}]
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        done = await asyncio.gather(*(engine.complete(prompt, params) for _ in range(copies)))
        return sum(c.num_output_tokens for c in done) / (time.perf_counter() - started)


async def throughput(model, threads, spec, requests) -> dict:
    async with Engine(model, threads=threads, speculative_config=spec, max_num_batched_tokens=2048,
                      enable_prefix_caching=False) as engine:
        await engine.complete("Warm up.", SamplingParams(max_tokens=8))
        started = time.perf_counter()
        done = await asyncio.gather(*(engine.complete(r.prompt_ids, SamplingParams(
            max_tokens=r.output_len, temperature=0, ignore_eos=True)) for r in requests))
        seconds = time.perf_counter() - started
        stats = await counters(engine)
        tokens = sum(c.num_output_tokens for c in done)
        return {"seconds": seconds, "output_tokens": tokens, "out_tok_s": tokens / seconds, **stats}


def summarize_single(rounds: list[dict], methods=METHODS) -> dict:
    """Per method and task: the rounds' tokens/s (total tokens over total seconds), acceptance, equality with off,
    and the share of the time the step's forwards and the draft model's took."""
    out = {}
    for method in methods:
        out[method] = {}
        for task in TASKS:
            runs = [r[method][task] for r in rounds]
            tokens = sum(r["output_tokens"] for r in runs)
            proposed = sum(r["spec_draft_tokens"] for r in runs)
            accepted = sum(r["spec_accepted_tokens"] for r in runs)
            draws = sum(r["spec_verified_draws"] for r in runs)
            out[method][task] = {
                "out_tok_s": tokens / sum(r["seconds"] for r in runs),
                "runs_out_tok_s": [round(r["output_tokens"] / r["seconds"], 1) for r in runs],
                "output_tokens": runs[0]["output_tokens"],
                "tokens_per_step": tokens / max(1, sum(r["steps"] for r in runs)),
                "acceptance_rate": accepted / proposed if proposed else 0.0,
                "mean_accepted_length": 1 + accepted / draws if draws else 0.0,
                "same_as_off": all(r["token_ids"] == o[task]["token_ids"] for r, o in
                                   zip(runs, [x["off"] for x in rounds])),
                "forward_share": sum(r["forward_seconds"] for r in runs) / sum(r["seconds"] for r in runs),
                "draft_share": sum(r["spec_draft_forward_seconds"] for r in runs) / sum(r["seconds"] for r in runs),
                "draft_forwards_per_step": sum(r["spec_draft_forwards"] for r in runs) / max(1, sum(
                    r["steps"] for r in runs)),
            }
    for method in methods:
        for task in TASKS:
            out[method][task]["speedup"] = out[method][task]["out_tok_s"] / out["off"][task]["out_tok_s"]
    return out


def plot_single(ax, single: dict, methods) -> None:
    import numpy as np

    x = np.arange(len(TASKS))
    for i, method in enumerate(methods):
        ax.bar(x + (i - 1) * 0.27, [single[method][t]["out_tok_s"] for t in TASKS], 0.27, label=method)
    ax.set_xticks(x, [t.replace(" a ", "\na ").replace(" from ", "\nfrom ") for t in TASKS], fontsize=8)
    ax.set_ylabel("output tokens/s, one stream")
    ax.legend(fontsize=8)
    ax.set_title("single stream, greedy")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2, 1.3]})
    plot_single(left, report["single_stream"], METHODS)
    sweep = report["batch_sweep"]
    mid.plot([s["copies"] for s in sweep], [s["ratio"] for s in sweep], marker="o")
    mid.axhline(1.0, color="#888", lw=0.8)
    mid.set_xscale("log", base=2)
    mid.set_xlabel("copy-edit requests at once")
    mid.set_ylabel("ngram / off, tokens/s")
    mid.set_title("where verifying stops paying")
    tp = report["throughput"]
    right.bar(["off", "ngram"], [tp["off"]["out_tok_s"], tp["ngram"]["out_tok_s"]], color=["#888", "#3a7"])
    right.set_title(f"{report['workload']['requests']} requests: {tp['ratio']:.1%}")
    right.set_ylabel("output tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, 16 requests, a shorter sweep")
    p.add_argument("--model", default=None, help="safetensors folder or .gguf (default: the default model)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all this process may use)")
    p.add_argument("--max-tokens", type=int, default=320, help="output tokens per task at most")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--draft", default=None, help="a draft model for the target (same tokenizer): the single-stream "
                                                 "tasks only, off vs ngram vs draft_model")
    p.add_argument("--quantization", default="auto", help="the target's --quantization (the draft's is auto: a "
                                                          "GGUF's blocks kept)")
    args = p.parse_args()
    load_at_start = Path("/proc/loadavg").read_text().split()[:3]
    rounds = 1 if args.quick else 2
    if args.draft:
        draft_main(args, rounds, load_at_start)
        return
    n = 16 if args.quick else 64
    copies = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16]
    vocab, special = vocabulary(hf_folder(args.model))
    requests = make_workload(WorkloadSpec(num_requests=n), vocab, special)
    no_limit = {"method": "ngram", "max_batch": 1024}

    async def run() -> dict:
        single = []
        for _ in range(rounds):
            single.append({m: await single_stream(args.model, args.threads, spec, args.max_tokens)
                           for m, spec in METHODS.items()})
        sweep = []
        for c in copies:
            off = [await batched(args.model, args.threads, None, c, 128) for _ in range(rounds)]
            on = [await batched(args.model, args.threads, no_limit, c, 128) for _ in range(rounds)]
            sweep.append({"copies": c, "off_out_tok_s": sum(off) / rounds, "ngram_out_tok_s": sum(on) / rounds,
                          "ratio": sum(on) / sum(off)})
        tp = {"off": [], "ngram": []}
        for _ in range(rounds):
            for name, spec in (("off", None), ("ngram", METHODS["ngram"])):
                tp[name].append(await throughput(args.model, args.threads, spec, requests))
        merged = {}
        for name, runs in tp.items():
            tokens, seconds = sum(r["output_tokens"] for r in runs), sum(r["seconds"] for r in runs)
            merged[name] = {"out_tok_s": tokens / seconds, "runs_out_tok_s": [round(r["out_tok_s"], 1) for r in runs],
                            **{k: sum(r[k] for r in runs) for k in SPEC_KEYS}}
        merged["ratio"] = merged["ngram"]["out_tok_s"] / merged["off"]["out_tok_s"]
        async with Engine(args.model) as engine:
            model = engine.describe()["model"]
        return {"model": model, "single": single, "sweep": sweep, "throughput": merged}

    result = asyncio.run(run())
    single = summarize_single(result["single"])
    report = {
        "command": "python -m bench.speculative" + (" --quick" if args.quick else ""),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": result["model"],
        "cpu_flags": cpu_flags(),
        "load_average_at_start": load_at_start,
        "rounds": rounds,
        "single_stream": single,
        "outputs": {t: result["single"][0]["off"][t]["text"] for t in TASKS},
        "batch_sweep": result["sweep"],
        "workload": describe(requests),
        "throughput": result["throughput"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculative.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "speculative.png")
    for task in TASKS:
        row = "  ".join(f"{m} {single[m][task]['out_tok_s']:.1f} ({single[m][task]['speedup']:.2f}x, "
                        f"accept {single[m][task]['acceptance_rate']:.0%}, same {single[m][task]['same_as_off']})"
                        for m in METHODS)
        print(f"{task:24s} {row}")
    for s in result["sweep"]:
        print(f"{s['copies']:3d} at once: off {s['off_out_tok_s']:.1f}, ngram {s['ngram_out_tok_s']:.1f} tok/s "
              f"({s['ratio']:.2f}x)")
    tp = result["throughput"]
    print(f"{n} requests: off {tp['off']['out_tok_s']:.1f}, ngram {tp['ngram']['out_tok_s']:.1f} out tok/s "
          f"({tp['ratio']:.1%})")
    print(f"wrote {args.out / 'speculative.json'} and speculative.png")


def draft_main(args, rounds: int, load_at_start: list[str]) -> None:
    methods = {"off": None, "ngram": METHODS["ngram"],
               "draft_model": {"method": "draft_model", "model": args.draft, "quantization": "auto"}}

    async def run() -> tuple[list[dict], dict, dict]:
        single = []
        for _ in range(rounds):
            single.append({m: await single_stream(args.model, args.threads, spec, args.max_tokens, args.quantization)
                           for m, spec in methods.items()})
        async with Engine(args.model, quantization=args.quantization) as engine:
            target = engine.describe()["model"]
        async with Engine(args.draft) as engine:
            draft = engine.describe()["model"]
        return single, target, draft

    rounds_out, target, draft = asyncio.run(run())
    single = summarize_single(rounds_out, methods)
    report = {
        "command": f"python -m bench.speculative --draft {args.draft} --quantization {args.quantization}"
                   + (f" --model {args.model}" if args.model else "") + (" --quick" if args.quick else ""),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": target, "draft_model": draft,
        "cpu_flags": cpu_flags(),
        "load_average_at_start": load_at_start,
        "rounds": rounds,
        "single_stream": single,
        "outputs": {t: rounds_out[0]["off"][t]["text"] for t in TASKS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculative_draft_model.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    plot_single(ax, single, methods)
    fig.tight_layout()
    fig.savefig(args.out / "speculative_draft_model.png", dpi=110)
    for task in TASKS:
        row = "  ".join(f"{m} {single[m][task]['out_tok_s']:.1f} ({single[m][task]['speedup']:.2f}x, "
                        f"accept {single[m][task]['acceptance_rate']:.0%}, draft {single[m][task]['draft_share']:.0%}"
                        f" of the time, same {single[m][task]['same_as_off']})" for m in methods)
        print(f"{task:24s} {row}")
    print(f"wrote {args.out / 'speculative_draft_model.json'} and speculative_draft_model.png")


if __name__ == "__main__":
    main()
