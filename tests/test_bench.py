"""The benchmark harness: a deterministic workload, and a tiny end-to-end run of all three engines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.workload import WorkloadSpec, make_workload

from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = {0, 1, 2}


def test_workload_is_seeded_clipped_and_free_of_special_tokens():
    spec = WorkloadSpec(num_requests=200, seed=3)
    a, b = make_workload(spec, 1000, SPECIAL), make_workload(spec, 1000, SPECIAL)
    assert [(r.prompt_ids, r.output_len) for r in a] == [(r.prompt_ids, r.output_len) for r in b]
    assert [r.prompt_ids for r in make_workload(WorkloadSpec(num_requests=200, seed=4), 1000, SPECIAL)] != \
        [r.prompt_ids for r in a]
    for r in a:
        assert 8 <= len(r.prompt_ids) <= 512 and 8 <= r.output_len <= 256
        assert not SPECIAL & set(r.prompt_ids) and max(r.prompt_ids) < 1000
        assert r.arrival == 0.0
    # Long-tailed: the mean sits above the median.
    outs = sorted(r.output_len for r in a)
    assert sum(outs) / len(outs) > outs[len(outs) // 2]


def test_online_and_shared_prefix_variants():
    spec = WorkloadSpec(num_requests=50, rate=4.0)
    online, offline = make_workload(spec, 1000, SPECIAL), make_workload(WorkloadSpec(num_requests=50), 1000, SPECIAL)
    assert [r.prompt_ids for r in online] == [r.prompt_ids for r in offline]  # same requests, only arrivals differ
    arrivals = [r.arrival for r in online]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals) and 5 < arrivals[-1] < 30  # ~50 / 4 req/s
    shared = make_workload(WorkloadSpec(num_requests=20, shared_prefix_len=256), 1000, SPECIAL)
    prefix = shared[0].prompt_ids[:256]
    assert all(r.prompt_ids[:256] == prefix and 264 <= len(r.prompt_ids) <= 512 for r in shared)
    assert len({tuple(r.prompt_ids[256:]) for r in shared}) == 20


def test_bench_end_to_end_on_tiny_model(tmp_path):
    """`kvmux bench` from another folder: relative --model and --out mean that folder's."""
    make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "kvmux", "bench", "--model", "tiny", "--requests", "5", "--max-prompt-len", "48",
           "--max-output-len", "32", "--mode", "both", "--rate", "20", "--static-batch-sizes", "4",
           "--out", "results", "--quick", "--transport", "http"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "bench_float32_http_quick.json").read_text())
    assert (out / "bench_float32_http_quick.png").stat().st_size > 0
    assert {"command", "machine", "dtype", "workload", "runs", "summary"} <= set(results)
    assert results["machine"]["cpu_count"] >= 1 and results["workload"]["distribution"]["output_mean"] > 0
    labels = {(r["label"], r["mode"]) for r in results["runs"]}
    assert labels == {("kvmux", "offline"), ("kvmux-http", "offline"), ("hf-static-b4", "offline"),
                      ("hf-cb", "offline"), ("kvmux", "online"), ("kvmux-http", "online"), ("hf-cb", "online")}
    wanted = results["workload"]["drawn"]["output_tokens"]
    for run in results["runs"]:
        assert "error" not in run, run.get("error")
        assert run["lengths_exact"] and run["output_tokens"] == wanted, run["label"]
        assert run["output_tok_s"] > 0 and run["peak_rss_mib"] > 0
        if run["mode"] == "online":
            assert {"p50", "p90", "p99"} <= set(run["ttft_s"]) and {"p50", "p90", "p99"} <= set(run["tpot_s"])
    kv = next(r for r in results["runs"] if r["label"] == "kvmux" and r["mode"] == "offline")["kvmux"]
    assert 0 < kv["peak_blocks_used"] <= kv["blocks_total"] and 0 <= kv["kv_waste_time_avg"] < 1
    assert {"preemptions", "prefix_hit_rate", "step_overhead_share"} <= set(kv)
    summary = results["summary"]
    assert summary["failed"] == [] and summary["static_best"] == "hf-static-b4"
    # The HTTP client (bench/http_load.py) played the same workload in a process of its own.
    assert summary["http_vs_api"]["online"]["cpu_seconds"]["http_client"] > 0
    assert summary["kvmux_vs_static_best"] > 0 and summary["kvmux_vs_hf_cb"] > 0


def test_http_transport_adds_a_kvmux_http_job_and_its_cost():
    from bench.__main__ import parse_args, plan, summarize_runs

    args = parse_args(["--mode", "online", "--engines", "kvmux,hf-cb", "--transport", "http"])
    jobs = plan(args, "float32", "folder", None, [])
    assert [(j.label, j.options.get("transport")) for j in jobs] == [("kvmux", None), ("kvmux-http", "http"),
                                                                      ("hf-cb", None)]
    runs = [{"label": label, "mode": "online", "engine": "kvmux", "output_tok_s": tok_s, "ttft_s": {"p50": ttft},
             "lengths_exact": True, "cpu_seconds": {"engine_process": engine_cpu, "client_process": client_cpu}}
            for label, tok_s, ttft, engine_cpu, client_cpu in (("kvmux", 100.0, 0.200, 50.0, 0.0),
                                                              ("kvmux-http", 99.0, 0.204, 52.0, 9.0))]
    cost = summarize_runs(runs)["http_vs_api"]
    assert cost["online"]["throughput_cost"] == pytest.approx(0.01)
    assert cost["online"]["ttft_p50_cost"] == pytest.approx(0.02) and cost["online"]["targets_met"]
    assert cost["online"]["cpu_seconds"] == {"api_engine": 50.0, "http_engine": 52.0, "http_client": 9.0}


def test_cpu_check_checks_what_runs_here_and_names_what_it_skips(tmp_path, monkeypatch):
    from bench import cpu_check
    from kvmux.ops import kernel_choice

    # A host without AVX-512 or AMX: only the AVX2 variants (and torch's oneDNN) run.
    monkeypatch.setattr(kernel_choice, "cpu_features", lambda: {"avx2": True, "fma": True})
    assert cpu_check.main(["--only", "/bfloat16", "--min-time", "0.001", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cpu_check.json").read_text())
    assert [c["check"] for c in result["checked"]] == ["linear/avx2/bfloat16", "linear/onednn/bfloat16",
                                                         "attention/avx2/bfloat16"]
    assert all(t["ok"] and t["kernel_ms"] > 0 and t["torch_ms"] > 0 for c in result["checked"] for t in c["trials"])
    needs = {s["check"]: s["needs"] for s in result["skipped"]}
    assert needs["linear/amx/bfloat16"] == ["avx512f", "avx512bw", "avx512vl", "avx512bf16", "amx_tile", "amx_bf16"]
    assert needs["attention/avx512bf16/bfloat16"] == ["avx512f", "avx512bw", "avx512vl", "avx512bf16"]


def test_bench_runs_llama_cpp_on_the_same_gguf(tmp_path, tiny):
    """The optional peer (llama-cpp-python, the `peers` extra; `make test` does not install it)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[peers]')")
    from gguf import GGMLQuantizationType as QT

    from tiny_gguf import matmuls_as, write_tiny_gguf

    model = write_tiny_gguf(tiny, tmp_path / "tiny.gguf", matmuls_as(QT.Q4_1))
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", "--model", str(model), "--engines", "kvmux,llama-cpp", "--requests", "5",
           "--max-prompt-len", "48", "--max-output-len", "16", "--mode", "both", "--rate", "20", "--out", str(out),
           "--quick"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "KVMUX_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "bench_float32_quick.json").read_text())
    assert {(r["label"], r["mode"]) for r in results["runs"]} == {
        ("kvmux", "offline"), ("llama-cpp", "offline"), ("kvmux", "online"), ("llama-cpp", "online")}
    wanted = results["workload"]["drawn"]["output_tokens"]
    for run in results["runs"]:
        assert "error" not in run, run.get("error")
        assert run["lengths_exact"] and run["output_tokens"] == wanted, run["label"]
    assert results["summary"]["kvmux_vs_llama_cpp"] > 0 and results["kvmux_quantization"] == "auto"


def test_efficiency_runs_on_the_tiny_model(tiny, tmp_path):
    """bench.efficiency drives the runner directly: a change of what the runner returns must not break it."""
    from bench import efficiency

    efficiency.main(["--model", tiny, "--batch", "2", "--prompt-len", "16", "--steps", "4", "--tokens-per-text", "24",
                     "--out", str(tmp_path)])
    result = json.loads((tmp_path / "efficiency.json").read_text())
    assert result["decode"]["tokens_per_s"] > 0 and 0 <= result["quality"]["argmax_agreement"] <= 1
    assert (tmp_path / "efficiency.png").is_file()


def test_peak_rss_records_each_generate_run(tiny, tmp_path):
    """bench.peak_rss runs `kvmux generate` in fresh processes and records each one's own peak."""
    from bench import peak_rss

    peak_rss.main(["--model", tiny, "--runs", "2", "--max-tokens", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / f"peak_rss_{Path(tiny).name}.json").read_text())
    # A python process with torch imported holds well over 50 MB; a tiny model nowhere near the target.
    assert len(result["peak_rss_kb"]) == 2 and all(50_000 < kb < 600_000 for kb in result["peak_rss_kb"])
    assert result["met"] and (tmp_path / f"peak_rss_{Path(tiny).name}.png").is_file()


def test_kquants_decode_only_records_both_ratios(tmp_path):
    """bench.kquants on a tiny Q4_K_M file (in a process of its own: it sets the process's thread counts): every
    batch has the best-of ratio and the round-by-round ones, one per round."""
    from bench.real_shapes import Shape, write
    from kvmux.model.loader import default_model_path

    shape = Shape(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, rope_base=10000.0, context=1024)
    path = write("tiny", shape, "q4_k_m", tmp_path / "tiny.gguf", default_model_path())
    subprocess.run([sys.executable, "-m", "bench.kquants", "--model", str(path), "--decode-only", "--rounds", "2",
                    "--out", str(tmp_path)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    result = json.loads((tmp_path / "kquants_tiny.json").read_text())
    assert [d["batch"] for d in result["decode"]] == [1, 2, 4, 8]
    for d in result["decode"]:
        assert len(d["speedup_paired"]) == 2 and d["speedup_paired_median"] in d["speedup_paired"]
        assert d["speedup"] == d["kept_tok_s"] / d["bf16_tok_s"] > 0
    assert result["storage"]["dequantized"] == {} and (tmp_path / "kquants_tiny.png").is_file()


@pytest.mark.parametrize("qtype, matmuls", [
    ("q8_0", {"q8_0": 9}), ("q4_0", {"q4_0": 9}), ("q4_1", {"q4_1": 9}),
    # Q4_K q, k, o, gate, up (Q4_1's form); Q6_K v, down and the embedding: per layer qkv in two pieces.
    ("q4_k_m", {"q4_1": 6, "q6_k": 5}), ("q5_k_m", {"q5_1": 6, "q6_k": 5})])
def test_real_shapes_writes_a_gguf_the_engine_runs(tmp_path, qtype, matmuls):
    """bench.real_shapes at a tiny shape: the file loads with its blocks kept and its shape, decodes, and its kept
    blocks score a text as the file dequantized does."""
    import asyncio

    from bench.real_shapes import Shape, write
    from kvmux import Engine, SamplingParams
    from kvmux.model.loader import default_model_path

    # K-quant blocks hold 256 weights: rows that long.
    shape = Shape(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, rope_base=10000.0, context=256)
    path = write("tiny", shape, qtype, tmp_path / "tiny.gguf", default_model_path())

    async def run():
        async with Engine(str(path), num_blocks=16, block_size=16) as engine:
            out = await engine.complete("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            return out.token_ids, engine.describe()

    tokens, described = asyncio.run(run())
    assert len(tokens) == 4
    assert described["quantization"]["matmuls"] == matmuls and not described["quantization"]["dequantized"]
    assert described["max_model_len"] == 256
    # Teacher-forced next-token argmax of the kept blocks against the dequantized file (float32 both). Measured
    # 99-100% on every type; Q5_K's fifth bits dropped at packing, 19%.
    import torch

    from kvmux.model.loader import load_model

    from engine_helpers import teacher_forced_logits

    ids = torch.randint(100, 49152, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    kept = teacher_forced_logits(load_model(path, dtype=torch.float32, progress=False).model, ids)
    dense = teacher_forced_logits(load_model(path, dtype=torch.float32, quantization="none", progress=False).model,
                                  ids)
    agreement = float((kept.argmax(-1) == dense.argmax(-1)).float().mean())
    assert agreement >= 0.9, f"{qtype}: {agreement:.1%}"
