"""int8 KV blocks (kv_cache_dtype="int8"): the kernels write the format the reference defines, read it as the
float64 reference does (test_kernel_checks runs that check), and everything that moves blocks keeps outputs the
same: preemption by swap and recompute, prefix hits, the disk tier, tensor parallelism."""
import asyncio

import pytest
import torch

from kvmux import Engine
from kvmux.cache.kv_cache import (
    KVCache,
    PoolGeometry,
    dequantize_rows,
    from_slabs,
    quantize_rows,
    rotate_rows,
    slab_positions,
    to_slabs,
)
from kvmux.checks.kernels import attention_reference
from kvmux.checks.reference import LAYER, NUM_LAYERS, expected_pool, make_case
from kvmux.ops.cpu_attention import cpu_paged_attention

from engine_helpers import MAX_NEW, PROMPTS, greedy, run_engine, teacher_forced_logits

INT8 = dict(kv_cache_dtype="int8", dtype="float32")


def test_rows_round_trip_within_half_a_step():
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 66)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((dequantize_rows(rows) - x).abs() <= 0.5 * step * 1.001 + 1e-7).all()
    assert (dequantize_rows(quantize_rows(torch.zeros(2, 64))) == 0).all()


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dim", [64, 20])
def test_a_slab_keeps_every_row_byte_once_where_the_kernel_reads_it(block_size, dim):
    """K: dword i of token t (head dims 4i .. 4i + 3) at dword i * block_size + t; V: head dim d of tokens
    4j .. 4j + 3 at dword j * dim + d; the float16 scales after the values, token by token."""
    for which in (0, 1):
        at = slab_positions(which, block_size, dim)
        assert torch.equal(at.flatten().sort().values, torch.arange(block_size * (dim + 2)))
        rows = torch.randint(-127, 128, (3, block_size, dim + 2), dtype=torch.int8)
        assert torch.equal(from_slabs(to_slabs(rows, which), which, block_size), rows)
    t, d = 5, 7
    assert slab_positions(0, block_size, dim)[t, d] == (1 * block_size + t) * 4 + 3
    assert slab_positions(1, block_size, dim)[t, d] == (1 * dim + d) * 4 + 1
    assert slab_positions(0, block_size, dim)[t, dim + 1] == block_size * dim + 2 * t + 1


@pytest.mark.parametrize("head_dim, block_size", [(18, 8), (64, 12), (64, 24)])
def test_an_int8_pool_refuses_shapes_its_kernels_do_not_read(head_dim, block_size):
    with pytest.raises(ValueError, match=f"head_dim a multiple of 4 and block_size 8 or a multiple of 16, got "
                                         f"{head_dim} and {block_size}"):
        KVCache(4, PoolGeometry(2, 1, head_dim, block_size, torch.int8))


@pytest.mark.parametrize("dim", [64, 128, 48, 16])
def test_the_rotation_is_orthonormal_and_its_own_inverse(dim):
    x = torch.randn(20, 3, dim, dtype=torch.float64)
    y = rotate_rows(x)
    assert torch.allclose(rotate_rows(y), x, atol=1e-12)
    assert torch.allclose((y * y).sum(-1), (x * x).sum(-1), rtol=1e-12)
    # It spreads one large channel over all of a block's: the row's int8 step shrinks by sqrt(block).
    spike = torch.zeros(dim, dtype=torch.float64)
    spike[3] = 1.0
    assert torch.allclose(rotate_rows(spike).abs().max(), torch.tensor(min(dim & -dim, 256) ** -0.5, dtype=torch.float64))


def with_k_mean(case, seed: int):
    """A per-(layer, KV head, channel) K offset on the case's pool, as a model's calibration would set."""
    g = torch.Generator().manual_seed(seed)
    geometry = case.cache.geometry
    case.cache.k_mean = 3 * torch.randn(NUM_LAYERS, geometry.num_kv_heads, geometry.head_dim, generator=g)
    return case


@pytest.mark.parametrize("dim", [64, 48, 20])  # rotated in one block of 64, in blocks of 16 (AVX2), of 4 (scalar)
@pytest.mark.parametrize("k_mean", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_writes_the_reference_format_byte_for_byte(dtype, k_mean, dim):
    case = make_case([1, 19, 1, 40], [1, 51, 16, 40], 9, 3, dim, 16, torch.int8, dtype, seed=5)
    if k_mean:
        with_k_mean(case, seed=6)
    want = expected_pool(case)
    cache = case.fresh_cache()
    cpu_paged_attention(case.q, case.k, case.v, cache, LAYER, case.batch(), case.scale)
    assert torch.equal(cache.kv, want)


@pytest.mark.parametrize("variant", ["avx2", "avx512vnni"])
@pytest.mark.parametrize("dim", [64, 128, 48, 20])
def test_a_k_mean_moves_no_output(variant, dim):
    """K stored less any offset common to a sequence's keys is attended as K: against float64 attention over the
    unrounded K and V, the kernel's error is int8's, and smaller with the keys' large common part taken out."""
    from kvmux import _native
    from kvmux.ops.cpu_attention import ATTENTION_KERNELS, CpuMetadata

    if not _native.attention_kernel_supported(ATTENTION_KERNELS[variant], _native.DType.i8, dim):
        pytest.skip(f"{variant} does not run here at head_dim {dim}")
    errors = {}
    for k_mean in (False, True):
        case = make_case([7, 1, 30], [40, 33, 30], 8, 2, dim, 16, torch.int8, torch.float32, seed=11)
        offset = 6 * torch.randn(2, dim, generator=torch.Generator().manual_seed(12))
        k = case.k + offset  # keys with a large common part, as RoPE'd K has
        cache = case.fresh_cache()
        if k_mean:
            cache.k_mean = torch.zeros(NUM_LAYERS, 2, dim)
            cache.k_mean[LAYER] = offset
        batch = case.batch()
        batch.attn_metadata = CpuMetadata(batch, cache, variant)
        out = cpu_paged_attention(case.q, k, case.v, cache, LAYER, batch, case.scale)
        # What the pool holds, attended in float64: the kernel's own rounding only.
        case.cache = cache
        ref, bound = attention_reference(variant, case, cache.kv)
        assert ((out.double() - ref).abs() <= bound + 2e-5).all()
        # Against exact attention over the new tokens' unrounded K and V, where every key is new (sequence 2).
        q, kk, vv = (t[8:].double() for t in (case.q, k, case.v))
        scores = torch.einsum("thd,shd->hts", q, kk.repeat_interleave(4, 1)) * case.scale
        scores = scores.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf"))
        exact = torch.einsum("hts,shd->thd", scores.softmax(-1), vv.repeat_interleave(4, 1))
        errors[k_mean] = float((out[8:].double() - exact).norm() / exact.norm())
    assert errors[True] < 0.02 and errors[True] < errors[False], errors


def test_int8_holds_about_twice_the_blocks_of_bf16(tiny):
    """A row of head_dim values costs head_dim + 2 bytes against bf16's 2 * head_dim: 1.94x the blocks at head_dim
    64 (SmolLM2, Llama 3.2), 3.88x float32's; the tiny model's head_dim 16 pays more for its scales."""
    async def blocks(kv_cache_dtype):
        async with Engine(tiny, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, kv_cache_gib=0.01,
                          max_num_seqs=1024) as engine:
            return engine.blocks.num_blocks, engine.geometry.head_dim
    (bf16, head_dim), (int8, _) = asyncio.run(blocks("auto")), asyncio.run(blocks("int8"))
    assert abs(int8 / bf16 - 2 * head_dim / (head_dim + 2)) < 0.01
    smollm2 = [PoolGeometry(30, 3, 64, 16, dtype).block_bytes for dtype in (torch.int8, torch.bfloat16, torch.float32)]
    assert smollm2[1] / smollm2[0] >= 1.9 and smollm2[2] / smollm2[0] >= 3.8


def test_next_token_agrees_with_float32_kv(tiny):
    """Teacher-forced over the prompts: the argmax with int8 KV is float32 KV's almost everywhere."""
    from kvmux.model.loader import load_model

    model = load_model(tiny, torch.float32).model
    agree = total = 0
    for prompt in PROMPTS[6:]:
        exact = teacher_forced_logits(model, prompt)
        quantized = teacher_forced_logits(model, prompt, kv_dtype=torch.int8)
        agree += int((exact.argmax(-1) == quantized.argmax(-1)).sum())
        total += len(prompt)
    assert agree / total >= 0.95


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_outputs_survive_preemption_and_prefix_hits(tiny, mode):
    roomy, _ = run_engine(tiny, PROMPTS, greedy(MAX_NEW), block_size=8, **INT8)
    tight, stats = run_engine(tiny, PROMPTS + PROMPTS, greedy(MAX_NEW), num_blocks=12, block_size=8,
                              preemption_mode=mode, **INT8)
    assert [c.token_ids for c in tight] == [c.token_ids for c in roomy] * 2
    assert stats[f"preemptions_{mode}"] > 0 and stats["prefix_cache_hits"] > 0


def test_the_torch_reference_backend_gives_the_same_outputs(tiny):
    native, _ = run_engine(tiny, PROMPTS[:6], greedy(16), attention_backend="native", **INT8)
    reference, _ = run_engine(tiny, PROMPTS[:6], greedy(16), attention_backend="torch", **INT8)
    assert [c.token_ids for c in native] == [c.token_ids for c in reference]


def test_the_disk_tier_keeps_int8_blocks_apart(tiny, tmp_path):
    roomy, _ = run_engine(tiny, PROMPTS[-2:], greedy(8), block_size=8, **INT8)
    run_engine(tiny, PROMPTS[-2:], greedy(8), block_size=8, dtype="float32", disk_cache_dir=str(tmp_path), disk_cache_gib=0.01)
    again, stats = run_engine(tiny, PROMPTS[-2:], greedy(8), block_size=8, disk_cache_dir=str(tmp_path), disk_cache_gib=0.01, **INT8)
    assert stats["disk_blocks_restored"] == 0  # the float32 engine's blocks are another store
    assert [c.token_ids for c in again] == [c.token_ids for c in roomy]
    again, stats = run_engine(tiny, PROMPTS[-2:], greedy(8), block_size=8, disk_cache_dir=str(tmp_path), disk_cache_gib=0.01, **INT8)
    assert stats["prefix_cache_hits_disk"] > 0 and [c.token_ids for c in again] == [c.token_ids for c in roomy]


def test_tensor_parallel_ranks_hold_int8_slices(tiny):
    one, _ = run_engine(tiny, PROMPTS[:4], greedy(12), **INT8)
    two, _ = run_engine(tiny, PROMPTS[:4], greedy(12), tensor_parallel_size=2, threads=1, **INT8)
    assert [c.token_ids for c in two] == [c.token_ids for c in one]

