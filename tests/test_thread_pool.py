"""The kernels' thread pool (native/cpu/thread_pool.h) and the thread count (kvmux/ops/threads.py).

Every kernel's result must be bit-for-bit the one thread's result however its tasks fall to threads: each
output element is computed whole inside one task. The pool's test hook delays every task by a random time
(sleeps and yields), which stands in for threads the OS deschedules at random points; nothing here times
anything.
"""
import asyncio
import threading

import pytest
import torch

from kvmux import Engine, SamplingParams, _native
from kvmux.checks.reference import random_gguf_blocks
from kvmux.ops import fused, kernel_choice, quant
from kvmux.ops.linear import PackedLinear, pack_weight
from kvmux.ops.threads import CpuBudget, cgroup_quota, set_threads, threads


@pytest.fixture
def delayed():
    """Tasks delayed by up to 300 us each while the test runs; the thread count restored after."""
    before = threads()
    _native.set_task_delay(300)
    yield
    _native.set_task_delay(0)
    set_threads(before)


def on_threads(n: int, fn):
    set_threads(n)
    return fn()


def linear_cases():
    g = torch.Generator().manual_seed(0)
    for variant in kernel_choice.runnable("linear", "q8_0"):
        for qtype in quant.QTYPES:  # each form, from the GGUF type of its name
            weight = quant.pack_blocks(qtype, random_gguf_blocks(qtype, 200, 256, g))
            yield f"{variant} {qtype}", quant.QuantLinear(weight, torch.randn(200, generator=g), variant.name)
    for dtype in (torch.float32, torch.bfloat16):
        for v in kernel_choice.runnable("linear", str(dtype).removeprefix("torch.")):
            if v.name == "onednn":
                continue
            w = torch.randn(200, 96, generator=g).to(dtype)
            kernel = {"avx2": None, "avx512bf16": _native.LinearKernel.bf16_avx512,
                      "amx": _native.LinearKernel.bf16_amx}[v.name]
            yield f"{v.name} {dtype}", PackedLinear(pack_weight(w), 96, 200, None, kernel)


@pytest.mark.parametrize("rows", [1, 7, 70])
def test_linear_kernels_match_one_thread_with_threads_delayed(rows, delayed):
    g = torch.Generator().manual_seed(rows)
    before = _native.pool_stats()
    for name, layer in linear_cases():
        x = torch.randn(rows, layer.in_features, generator=g)
        alone = on_threads(1, lambda: layer(x))
        for n in (2, 3):
            assert torch.equal(on_threads(n, lambda: layer(x)), alone), f"{name} on {n} threads, {rows} rows"
    after = _native.pool_stats()
    assert after["shared_calls"] > before["shared_calls"] and after["helper_tasks"] > before["helper_tasks"], \
        "the helpers never took part: the test checked nothing about sharing"


def test_fused_ops_match_one_thread_with_threads_delayed(delayed):
    g = torch.Generator().manual_seed(5)
    rows, h = 300, 576  # enough rows that the ops split into tasks
    x, res, w = (torch.randn(rows, h, generator=g) for _ in range(3))
    w = w[0].contiguous()
    cos, sin = torch.randn(rows, 32, generator=g), torch.randn(rows, 32, generator=g)

    def run():
        r = res.clone()
        rotated = x.clone()
        assert fused.rope_inplace(rotated, 9, 64, cos, sin)
        return (fused.rms_norm(x, w, 1e-6), *fused.add_rms_norm(x, r, w, 1e-6), rotated,
                fused.silu_mul(torch.cat([x, res], dim=1)))

    alone = on_threads(1, run)
    for a, b in zip(on_threads(2, run), alone):
        assert torch.equal(a, b)


def test_concurrent_callers_each_get_their_own_result():
    """Calls from several Python threads at once: one shares the pool, the others run alone; none mixes up."""
    before = threads()
    g = torch.Generator().manual_seed(9)
    layer = quant.QuantLinear(quant.pack_blocks("q8_0", random_gguf_blocks("q8_0", 512, 256, g)))
    xs = [torch.randn(16, 256, generator=g) for _ in range(4)]
    expected = [on_threads(1, lambda x=x: layer(x)) for x in xs]
    set_threads(2)
    start, results = threading.Barrier(len(xs)), [[] for _ in xs]

    def caller(i):
        start.wait()
        for _ in range(50):
            results[i].append(layer(xs[i]))

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(len(xs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    set_threads(before)
    for got, want in zip(results, expected):
        assert all(torch.equal(r, want) for r in got)


def test_engine_output_is_the_same_on_one_thread_and_on_delayed_threads(tiny, delayed, monkeypatch):
    # Both loads pinned to this CPU's widest bf16 matmul: each load times its candidates, and bf16's variants
    # round differently (avx2 keeps x in float32, avx512bf16 rounds it), so two loads could time two kernels and
    # a near-tie of the random model flip, which says nothing about threads. (Attention is chosen by shape.)
    pinned = kernel_choice.candidates("linear", "bfloat16")[-1].name
    monkeypatch.setenv(kernel_choice.ENV, f"linear={pinned}")

    async def run(n):
        async with Engine(tiny, threads=n, num_blocks=64, block_size=8) as engine:
            outs = await asyncio.gather(*[engine.complete(p, SamplingParams(max_tokens=12, temperature=0))
                                          for p in ("The cache", "Blocks of keys and values", "One")])
            described, stats = engine.describe(), await engine.stats()
        return [o.token_ids for o in outs], described, stats

    one, _, _ = asyncio.run(run(1))
    two, described, stats = asyncio.run(run(2))
    assert one == two
    assert {r["variant"] for shape in described["kernels"]["linear"] for r in shape["ranges"]} == {pinned}
    assert described["threads"]["threads"] == 2 and described["threads"]["chosen_by"] == "the threads setting"
    assert stats["threads"] == 2 and stats["pool_helper_tasks"] > 0


def test_a_threads_setting_below_one_is_refused():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        set_threads(0)


def cgroup_files(tmp_path, lines: str, files: dict[str, str]):
    (tmp_path / "self_cgroup").write_text(lines)
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "self_cgroup", tmp_path / "fs"


@pytest.mark.parametrize(("lines", "files", "quota"), [
    ("0::/pod/app\n", {"pod/app/cpu.max": "150000 100000\n"}, 1.5),
    ("0::/pod/app\n", {"pod/app/cpu.max": "max 100000\n", "pod/cpu.max": "50000 100000\n"}, 0.5),  # a parent's
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/\n", {}, None),
    ("4:memory:/x\n2:cpu,cpuacct:/docker/c1\n", {"cpu,cpuacct/docker/c1/cpu.cfs_quota_us": "300000\n",
                                                "cpu,cpuacct/docker/c1/cpu.cfs_period_us": "100000\n"}, 3.0),
    ("1:cpu:/k\n", {"cpu/k/cpu.cfs_quota_us": "-1\n", "cpu/k/cpu.cfs_period_us": "100000\n"}, None),
])
def test_cgroup_quota_is_read_from_v1_and_v2_files(tmp_path, lines, files, quota):
    assert cgroup_quota(*cgroup_files(tmp_path, lines, files)) == quota


@pytest.mark.parametrize(("budget", "count"), [
    (CpuBudget(16, 1.5), 1), (CpuBudget(16, 0.5), 1), (CpuBudget(2, 4.0), 2), (CpuBudget(8, None), 8),
    (CpuBudget(16, 2.0), 2),
])
def test_threads_follow_the_smaller_of_affinity_and_quota(budget, count):
    assert budget.threads == count
    assert ("quota" in budget.reason()) == (budget.quota is not None and budget.quota < budget.affinity)
