"""The native decoder stack (kvmux/model/native_stack.py) against the Python layers it stands in for: the same
kernels, chosen by the same plan, in the same order, so the same logits bit for bit, on every kind of matmul a
packed model holds (float32 and bf16 panels, quantized blocks, a merged matmul in pieces, biases) and both
KV pools, through prefill chunks and decode steps."""
import asyncio
from dataclasses import replace
from functools import partial

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from kvmux import Engine
from kvmux.cache.kv_cache import KVCache, PoolGeometry
from kvmux.model.config import SLIDING
from kvmux.model.loader import load_model
from kvmux.runner.k_mean import set_k_mean
from kvmux.step.forward_batch import ForwardBatch
from kvmux.step.work import Chunk

from tiny_gguf import matmuls_as, write_tiny_gguf
from tiny_model import make_tiny_model

pytestmark = pytest.mark.usefixtures("scratch_cache")

IDS = [5, 17, 3, 99, 42, 8, 250, 7, 61, 13, 2, 77, 31, 19, 120, 4, 66, 9, 180, 23, 44]


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, tuple[str, torch.dtype]]:
    folder = tmp_path_factory.mktemp("stack")
    # q and k in Q4_1 but v in Q5_0 (no form holds both: the merged qkv runs in two pieces); down in F16 (no
    # kernel: dequantized to packed panels); the rest in Q8_0.
    mixed = {"q_proj": QT.Q4_1, "k_proj": QT.Q4_1, "v_proj": QT.Q5_0, "down_proj": QT.F16}
    return {
        "float32": (tiny, torch.float32),
        "bfloat16": (tiny, torch.bfloat16),
        "qwen2 biases": (str(make_tiny_model(folder / "qwen2", model_type="qwen2")), torch.float32),
        "q4_1": (str(write_tiny_gguf(tiny, folder / "q4_1.gguf", matmuls_as(QT.Q4_1))), torch.float32),
        "pieces": (str(write_tiny_gguf(tiny, folder / "mixed.gguf", lambda name: next(
            (t for part, t in mixed.items() if f".{part}." in name), QT.Q8_0 if "blk" in name else QT.F32))),
            torch.float32),
    }


def steps(model, kv_dtype: torch.dtype, block_size: int) -> list[torch.Tensor]:
    """Logits of a prefill chunk of most of IDS (every position), then one decode step per remaining id."""
    blocks = -(-len(IDS) // block_size)
    cache = KVCache(blocks, PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, block_size,
                                         kv_dtype))
    if kv_dtype == torch.int8:
        set_k_mean(cache, torch.randn(model.num_layers, model.num_kv_heads, model.head_dim,
                                      generator=torch.Generator().manual_seed(0)))
    out, start = [], len(IDS) - 3
    with torch.inference_mode():
        batch = ForwardBatch.build([Chunk("s", 0, IDS[:start], list(range(blocks)))], block_size)
        batch.logits_indices = torch.arange(start)
        out.append(model(batch, cache))
        for pos in range(start, len(IDS)):
            out.append(model(ForwardBatch.build([Chunk("s", pos, [IDS[pos]], list(range(blocks)))], block_size),
                             cache))
    return out


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "qwen2 biases", "q4_1", "pieces"])
@pytest.mark.parametrize("kv, block_size", [("model", 16), ("int8", 8)])
def test_the_native_stack_gives_the_python_layers_logits_bit_for_bit(models, kind, kv, block_size):
    path, dtype = models[kind]
    model = load_model(path, dtype, progress=False).model
    assert model.native_stack is not None and model.kernel_choices()["native_stack"]
    if kind == "pieces":
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.pieces is not None and model.model.layers[0].mlp.down_proj.quant is None
    kv_dtype = torch.int8 if kv == "int8" else model.dtype
    native = steps(model, kv_dtype, block_size)
    model.native_stack = None  # the Python layers, as every other model runs
    python = steps(model, kv_dtype, block_size)
    for got, want in zip(native, python, strict=True):
        assert torch.equal(got, want)


def gemma_steps(model, pools: str, kv_dtype: torch.dtype) -> list[torch.Tensor]:
    """As steps, for Gemma 3 past its 10-token window, over one pool of every layer or the sliding-window layers'
    own pool beside the full-attention layers' (each block its slot there)."""
    bs, blocks = 8, -(-len(IDS) // 8)
    sliding = sum(t == SLIDING for t in model.config.layer_types)
    whole = PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, bs, kv_dtype)
    if pools == "one":
        cache = KVCache(blocks, whole)
    else:
        cache = KVCache(blocks, replace(whole, num_layers=model.num_layers - sliding),
                        sliding=KVCache(blocks, replace(whole, num_layers=sliding)))
    table = list(range(blocks))
    chunk = partial(Chunk, block_table=table, sliding_table=table if pools == "split" else [])
    out, start = [], len(IDS) - 3
    with torch.inference_mode():
        batch = ForwardBatch.build([chunk("s", 0, IDS[:start])], bs)
        batch.logits_indices = torch.arange(start)
        out.append(model(batch, cache))
        for pos in range(start, len(IDS)):
            out.append(model(ForwardBatch.build([chunk("s", pos, [IDS[pos]])], bs), cache))
    return out


@pytest.mark.parametrize("pools", ["one", "split"])
@pytest.mark.parametrize("kind", ["float32", "q8_0", "bf16 pool"])
def test_a_gemma_stack_gives_the_python_layers_logits_bit_for_bit(gemma, pools, kind):
    """Gemma 3's layers (q/k norms, the sandwich norms, GELU, local and global ropes, a window over one pool or
    the sliding layers' own) natively, against its Python layers over the same kernels."""
    dtype = torch.bfloat16 if kind == "bf16 pool" else torch.float32
    model = load_model(gemma, dtype, quantization="q8_0" if kind == "q8_0" else "auto", progress=False).model
    assert model.native_stack is not None
    native = gemma_steps(model, pools, dtype)
    model.native_stack = None
    python = gemma_steps(model, pools, dtype)
    for got, want in zip(native, python, strict=True):
        assert torch.equal(got, want)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> str:
    """A tiny Gemma 3: three layers, two of them sliding-window ones."""
    return str(make_tiny_model(tmp_path_factory.mktemp("gemma") / "m", model_type="gemma3_text", num_layers=3,
                               num_kv_heads=1, seed=3))


def test_a_k_mean_of_the_wrong_shape_or_device_is_refused_by_name(tiny):
    """The stack reads each layer's K offset by address: one too short would be read past its end."""
    model = load_model(tiny, progress=False).model
    cache = KVCache(4, PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, 8, torch.int8))
    cache.k_mean = torch.zeros(1, model.num_kv_heads, model.head_dim)
    with pytest.raises(ValueError, match=r"kv_cache.k_mean: expected float32 \[2 layers or more"):
        model(ForwardBatch.build([Chunk("s", 0, IDS[:5], [0])], 8), cache)
    # The right shape on another device than the pool's is read by address too.
    cache.k_mean = torch.zeros(model.num_layers, model.num_kv_heads, model.head_dim, device="meta")
    with pytest.raises(ValueError, match=r"k_mean: .* on cpu, got torch.float32 .* on meta"):
        model(ForwardBatch.build([Chunk("s", 0, IDS[:5], [0])], 8), cache)


def test_what_it_cannot_run_keeps_the_python_layers(tiny, tmp_path):
    qwen3 = make_tiny_model(tmp_path / "qwen3", model_type="qwen3")  # q/k norms
    assert load_model(str(qwen3), progress=False).model.native_stack is None
    assert load_model(tiny, attention_backend="torch", progress=False).model.native_stack is None


def test_the_engine_runs_it(tiny):
    async def describe():
        async with Engine(tiny, num_blocks=64) as engine:
            return engine.describe()
    assert asyncio.run(describe())["kernels"]["native_stack"] is True
