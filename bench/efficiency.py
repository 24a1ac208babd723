"""How well kvmux uses the machine, and what bf16 costs in quality (issues 7 and 15).

    python -m bench.efficiency                 # SmolLM2-135M, fp32 and bf16 decode + bf16-vs-fp32 quality
    python -m bench.efficiency --skip-quality  # fp32 decode efficiency only

Decode efficiency: 64 sequences are prefilled with 256-token prompts, then
steady-state decode steps run through the engine's runner (forward, sampling);
their FLOP rate (2 x parameters per token plus attention) is compared with the
rate of a plain torch matmul over weights of the model's shapes measured in the same
run, at 64 rows (the decode step's shape) and at 512 rows (the best this
machine's BLAS does), for the model's dtype.

The bf16 model's decode steps are timed the same way, in the same run (its
speedup over fp32 is issue 15's matmul-and-attention share of the end-to-end
2x target).

Quality: the bf16 and fp32 models are fed the same real English text (Python's
own reference documentation, `pydoc_data.topics`) with teacher forcing; per
position, whether the next-token argmax agrees and the KL divergence of the
bf16 distribution from the fp32 one. The bf16 model runs the kernels its load
timed fastest; since those differ by row count (and a teacher-forced text is
one many-row step), it is also run with each bf16 matmul kernel this CPU has
forced through KVMUX_KERNELS, so the kernels decode steps use are measured too
(and torch's oneDNN, which the engine does not choose by itself).

Quantized (`--quantized`): the same teacher-forced comparison with fp32 (the
GGUF dequantized) for kvmux keeping the file's blocks (the default model's
Q4_1), kvmux quantizing every matmul to Q8_0, and llama.cpp's own logits on the
same token ids from the same file (when llama-cpp-python is installed); and
decode steps at 1-8 sequences, kept blocks vs fp32, in the same run.

Writes bench/results/efficiency.json and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvmux.cache.kv_cache import KVCache, PoolGeometry
from kvmux.model.llama import Embedding, Linear
from kvmux.model.loader import load_model
from kvmux.ops import kernel_choice
from kvmux.ops.threads import set_threads
from kvmux.runner.runner import Runner
from kvmux.sampling import SamplingParams
from kvmux.step.forward_batch import ForwardBatch
from kvmux.step.work import Chunk, Draw, StepWork

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
TOPICS = ["assignment", "class", "exceptions", "for", "function", "import", "lambda", "with", "while", "if"]


def geometry(model) -> PoolGeometry:
    return PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, BLOCK, model.dtype)


def matmul_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of every matmul in a forward: the layers' and the lm_head (the embedding, when tied)."""
    shapes = [(m.out_features, m.in_features) for m in model.modules()
              if isinstance(m, Linear) and not isinstance(m, Embedding)]
    if model.lm_head is None:
        shapes.append((model.model.embed_tokens.out_features, model.model.embed_tokens.in_features))
    return shapes


def matmul_gflops(model, rows: int, repeats: int = 3) -> float:
    """F.linear over weights of every matmul's shape in the model (the lm_head included) at `rows` rows.

    Fresh [out, in] weights: a loaded float32 model holds its own only in the native kernel's packed form."""
    weights = [torch.randn(n, k, dtype=model.dtype) for n, k in matmul_shapes(model)]
    inputs = {k: torch.randn(rows, k, dtype=model.dtype) for k in {w.shape[1] for w in weights}}
    flops = sum(2 * rows * w.numel() for w in weights)
    best = math.inf
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


@contextlib.contextmanager
def torch_on_one_thread():
    """As the engine runs its forward (Engine.start): torch on one thread, so that its OpenMP threads, spinning after
    each of its own ops, leave the kernel pool's cores alone (bench/kquants.py measured what they cost)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_efficiency(model, batch: int, prompt_len: int, steps: int) -> dict:
    with torch_on_one_thread():
        return _decode_efficiency(model, batch, prompt_len, steps)


def prefill_seconds(model, prompt_len: int, repeats: int) -> float:
    """The best of `repeats` prefills of one prompt of `prompt_len` random tokens in one step (the runner's forward
    and sampling), torch on one thread as in decode_efficiency."""
    with torch_on_one_thread():
        blocks = math.ceil((prompt_len + 1) / BLOCK)
        runner = Runner(model, KVCache(blocks, geometry(model)))
        gen = torch.Generator().manual_seed(0)
        best = math.inf
        for _ in range(repeats):
            prompt = torch.randint(100, model.config.vocab_size, (prompt_len,), generator=gen).tolist()
            work = StepWork([Chunk("s", 0, prompt, list(range(blocks)), Draw(SamplingParams(temperature=0.0), 0, 0))])
            start = time.perf_counter()
            runner.execute(work)
            best = min(best, time.perf_counter() - start)
        return best


def _decode_efficiency(model, batch: int, prompt_len: int, steps: int) -> dict:
    cfg = model.config
    blocks_per_seq = math.ceil((prompt_len + steps + 1) / BLOCK)
    cache = KVCache(batch * blocks_per_seq, geometry(model))
    runner = Runner(model, cache)
    gen = torch.Generator().manual_seed(0)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    greedy = SamplingParams(temperature=0.0)
    prompts = [torch.randint(100, cfg.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    last = []
    per_step = max(1, 2048 // prompt_len)  # prefill a few whole prompts per step, as the engine does offline
    for i in range(0, batch, per_step):
        work = [Chunk(f"s{j}", 0, prompts[j], tables[j], Draw(greedy, 0, 0)) for j in range(i, min(batch, i + per_step))]
        last += [run[0].token for run in runner.execute(StepWork(work))]
    times = []
    for step in range(steps):
        pos = prompt_len + step
        start = time.perf_counter()
        work = StepWork([Chunk(f"s{j}", pos, [t], tables[j], Draw(greedy, 0, 0)) for j, t in enumerate(last)])
        last = [run[0].token for run in runner.execute(work)]
        times.append(time.perf_counter() - start)
    steady = sorted(times[2:])[len(times[2:]) // 2]  # median, past the first steps' warm-up
    params = sum(n * k for n, k in matmul_shapes(model))  # the tied embedding counts once: as the lm_head
    attn_heads = cfg.num_attention_heads
    mean_ctx = prompt_len + steps / 2
    flops_per_token = 2 * params + 4 * mean_ctx * attn_heads * model.head_dim * model.num_layers
    return dict(batch=batch, prompt_len=prompt_len, steps=steps, step_s_median=steady,
                tokens_per_s=batch / steady, flops_per_token=flops_per_token,
                achieved_gflops=batch * flops_per_token / steady / 1e9, parameters=params)


def quality(fp32, bf16, tokenizer, tokens_per_text: int) -> dict:
    """bf16's teacher-forced next-token argmax agreement with fp32 and KL divergence from it."""
    from pydoc_data.topics import topics

    agree = total = 0
    kls = []
    for topic in TOPICS:
        ids = tokenizer.tokenize(topics[topic])[:tokens_per_text]
        logits = {}
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            blocks = math.ceil(len(ids) / BLOCK)
            cache = KVCache(blocks, geometry(model))
            batch = ForwardBatch.build([Chunk("text", 0, ids, list(range(blocks)))], BLOCK)
            batch.logits_indices = torch.arange(len(ids))  # teacher forcing: every position's next-token logits
            with torch.inference_mode():
                logits[name] = model(batch, cache).float()
        ref, test = F.log_softmax(logits["fp32"], -1), F.log_softmax(logits["bf16"], -1)
        agree += int((ref.argmax(-1) == test.argmax(-1)).sum())
        total += len(ids)
        kls.append(F.kl_div(test, ref, log_target=True, reduction="none").sum(-1))
    kl = torch.cat(kls)
    return dict(texts=TOPICS, positions=total, argmax_agreement=agree / total, kl_mean=float(kl.mean()),
                kl_p99=float(kl.quantile(0.99)), source="pydoc_data.topics (Python's reference documentation)")


def text_ids(tokenizer, tokens_per_text: int) -> list[list[int]]:
    """The token ids of the texts quality() reads."""
    from pydoc_data.topics import topics

    return [tokenizer.tokenize(topics[topic])[:tokens_per_text] for topic in TOPICS]


def kvmux_logits(model, ids: list[int]) -> torch.Tensor:
    blocks = math.ceil(len(ids) / BLOCK)
    batch = ForwardBatch.build([Chunk("text", 0, ids, list(range(blocks)))], BLOCK)
    batch.logits_indices = torch.arange(len(ids))
    with torch.inference_mode():
        return model(batch, KVCache(blocks, geometry(model))).float()


def agreement_with(reference: list[torch.Tensor], test: list[torch.Tensor]) -> dict:
    """Argmax agreement and KL(reference || test) over every position of every text."""
    ref = torch.cat([F.log_softmax(r, -1) for r in reference])
    got = torch.cat([F.log_softmax(t, -1) for t in test])
    kl = F.kl_div(got, ref, log_target=True, reduction="none").sum(-1)
    return dict(positions=len(ref), argmax_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                kl_mean=float(kl.mean()), kl_p99=float(kl.quantile(0.99)))


def quantized_comparison(model_arg: str | None, fp32, tokenizer, tokens_per_text: int, threads: int) -> dict:
    """kvmux's kept blocks, kvmux's Q8_0 and llama.cpp vs fp32 (teacher-forced), and decode at 1-8 sequences."""
    texts = text_ids(tokenizer, tokens_per_text)
    reference = [kvmux_logits(fp32, ids) for ids in texts]
    kept = load_model(model_arg, progress=False)  # quantization auto: a GGUF's own blocks
    q8 = load_model(model_arg, quantization="q8_0", progress=False)
    out = {"quality": {}, "storage": {"kept": kept.quantization, "q8_0": q8.quantization}}
    for name, loaded in (("kvmux_kept", kept), ("kvmux_q8_0", q8)):
        out["quality"][name] = agreement_with(reference, [kvmux_logits(loaded.model, ids) for ids in texts])
    try:
        from bench.engines.llama_cpp import LlamaCpp, gguf_path

        llm = LlamaCpp(gguf_path(model_arg), max(map(len, texts)) + 16, max(map(len, texts)), 1, threads)
    except (RuntimeError, ValueError) as exc:
        out["quality"]["llama_cpp"] = {"skipped": str(exc)}
    else:
        out["quality"]["llama_cpp"] = agreement_with(reference, [torch.from_numpy(llm.logits(ids)) for ids in texts])
        llm.close()
    out["decode"] = []
    for batch in (1, 2, 4, 8):
        rates = {name: decode_efficiency(m, batch, 256, 16)["tokens_per_s"] for name, m in
                 (("fp32", fp32), ("kept", kept.model))}
        out["decode"].append(dict(batch=batch, fp32_tok_s=rates["fp32"], kept_tok_s=rates["kept"],
                                  speedup=rates["kept"] / rates["fp32"]))
        print(f"decode, {batch} sequences: fp32 {rates['fp32']:.1f} tok/s, kept blocks {rates['kept']:.1f} "
              f"(x{rates['kept'] / rates['fp32']:.2f})", flush=True)
    q = out["quality"]
    for name, r in q.items():
        if "argmax_agreement" in r:
            print(f"{name} vs fp32 over {r['positions']} positions: argmax agreement {r['argmax_agreement']:.2%}, "
                  f"mean KL {r['kl_mean']:.5f}", flush=True)
    out["targets"] = {"q8_0_argmax_agreement": 0.97, "kept_within_llama_cpp": 0.01, "decode_speedup_1_to_8": 2.0}
    if "argmax_agreement" in q["llama_cpp"]:
        out["kept_minus_llama_cpp"] = q["kvmux_kept"]["argmax_agreement"] - q["llama_cpp"]["argmax_agreement"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result["decode"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = ["matmul\n512 rows", "matmul\n64 rows", f"kvmux decode\n{d['batch']} seqs"]
    values = [result["matmul_gflops"]["512"], result["matmul_gflops"]["64"], d["achieved_gflops"]]
    bars = ax.bar(labels, values, color=["#999", "#bbb", "#2a7"])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel(f"GFLOP/s ({result['dtype']}, {result['threads']} threads)")
    title = f"decode uses {result['utilization_vs_best']:.0%} of the best matmul rate"
    if result.get("quality"):
        q = result["quality"]
        title += f"\nbf16 vs fp32: argmax agreement {q['argmax_agreement']:.1%}, mean KL {q['kl_mean']:.4f}"
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="safetensors folder or .gguf [default: SmolLM2-135M-Instruct]")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--tokens-per-text", type=int, default=256)
    p.add_argument("--skip-quality", action="store_true", help="no bf16 model, no quality comparison")
    p.add_argument("--quantized", action="store_true",
                   help="also compare quantized weights with fp32: kvmux keeping a GGUF's blocks, kvmux's Q8_0 and "
                        "llama.cpp (if installed) on quality, kept blocks on decode at 1-8 sequences")
    p.add_argument("--threads", type=int, default=None, help="threads of torch and of kvmux's kernels [default: all cores]")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # torch's side of the comparisons
    set_threads(threads)  # kvmux's kernels

    loaded = load_model(args.model, dtype=torch.float32, progress=False, quantization="none")
    model = loaded.model
    rates = {str(rows): matmul_gflops(model, rows) for rows in (64, 512)}
    print(f"matmul over the model's weights: {rates['64']:.1f} GFLOP/s at 64 rows, {rates['512']:.1f} at 512",
          flush=True)
    decode = decode_efficiency(model, args.batch, args.prompt_len, args.steps)
    best = max(rates.values())
    print(f"decode, {args.batch} sequences: {decode['tokens_per_s']:.1f} tok/s, {decode['achieved_gflops']:.1f} "
          f"GFLOP/s = {decode['achieved_gflops'] / best:.0%} of the best matmul rate, "
          f"{decode['achieved_gflops'] / rates['64']:.0%} of the 64-row rate", flush=True)
    result = dict(command="python -m bench.efficiency", model=loaded.name, dtype="float32", threads=threads,
                  machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  matmul_gflops=rates, decode=decode, utilization_vs_best=decode["achieved_gflops"] / best,
                  utilization_vs_64_rows=decode["achieved_gflops"] / rates["64"], target_utilization=0.5,
                  created=time.strftime("%Y-%m-%d %H:%M:%S"))
    if not args.skip_quality:
        bf16 = load_model(args.model, dtype=torch.bfloat16, progress=False, quantization="none").model
        result["decode_bfloat16"] = d16 = decode_efficiency(bf16, args.batch, args.prompt_len, args.steps)
        result["bf16_decode_speedup"] = decode["step_s_median"] / d16["step_s_median"]
        print(f"bf16 decode, {args.batch} sequences: {d16['tokens_per_s']:.1f} tok/s = "
              f"{result['bf16_decode_speedup']:.2f}x fp32", flush=True)
        result["quality"] = q = quality(model, bf16, loaded.tokenizer, args.tokens_per_text)
        result["quality"]["kernels"] = bf16.kernel_choices()["linear"]
        result["quality"]["targets"] = {"argmax_agreement": 0.99}
        print(f"bf16 vs fp32 over {q['positions']} positions: argmax agreement {q['argmax_agreement']:.2%}, "
              f"mean KL {q['kl_mean']:.5f} (p99 {q['kl_p99']:.5f})", flush=True)
        result["quality_by_kernel"] = by_kernel = {}
        previous = os.environ.get(kernel_choice.ENV)
        for v in kernel_choice.runnable("linear", "bfloat16"):
            os.environ[kernel_choice.ENV] = f"linear={v.name}"
            try:
                forced = load_model(args.model, dtype=torch.bfloat16, progress=False,
                                    quantization="none").model
            finally:
                os.environ.pop(kernel_choice.ENV)
                if previous is not None:
                    os.environ[kernel_choice.ENV] = previous
            by_kernel[v.name] = qv = quality(model, forced, loaded.tokenizer, args.tokens_per_text)
            print(f"  linear={v.name}: argmax agreement {qv['argmax_agreement']:.2%}, mean KL {qv['kl_mean']:.5f}",
                  flush=True)
    if args.quantized:
        result["quantized"] = quantized_comparison(args.model, model, loaded.tokenizer, args.tokens_per_text, threads)
    result["loadavg_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "efficiency.png")
    print(f"wrote {args.out / 'efficiency.json'} and .png")


if __name__ == "__main__":
    main()
