"""dtype="auto" and the kernel choices the engine reports: a table in describe(), numbers in stats()."""
import asyncio

import pytest

from kvmux import Engine, _native
from kvmux.config import EngineConfig, resolve_dtype
from kvmux.model.llama import Linear
from kvmux.ops import kernel_choice
from kvmux.ops.linear import ROW_RANGES

from engine_helpers import assert_no_leaks, greedy


@pytest.mark.parametrize("features,want", [
    ({"avx512bf16": True, "amx_bf16": True}, "bfloat16"),
    ({"avx512bf16": True, "amx_bf16": False}, "bfloat16"),  # Zen 4: AVX512-BF16, no AMX
    ({"avx512bf16": False, "amx_bf16": False}, "float32"),  # AVX2-only hosts
])
def test_auto_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, features, want):
    monkeypatch.setattr(_native, "cpu_features", lambda: features)
    assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype("auto", "cuda") == "float32"
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_auto_is_the_default_and_dtypes_are_checked():
    assert EngineConfig().dtype == "auto"
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, not 'float16'"):
        EngineConfig(dtype="float16").validate()


def run(tiny, **options):
    async def main():
        async with Engine(tiny, num_blocks=32, block_size=8, **options) as engine:
            done = await engine.complete([5, 6, 7, 8], greedy(4))
            stats, described = await engine.stats(), engine.describe()
            assert_no_leaks(engine)
            described["shapes"] = {(m.out_features, m.in_features) for m in engine.loaded.model.modules()
                                   if isinstance(m, Linear)}
            return done, stats, described

    return asyncio.run(main())


def test_default_engine_resolves_auto_and_reports_its_kernels(tiny):
    done, stats, described = run(tiny)
    assert len(done.token_ids) == 4
    features = kernel_choice.cpu_features()
    assert described["dtype"] == ("bfloat16" if features["avx512bf16"] or features["amx_bf16"] else "float32")
    assert described["config"]["dtype"] == "auto"
    kernels = described["kernels"]
    # Every matmul shape of the tiny model, a kernel per row range, each a variant this CPU runs.
    runnable = {v.name for v in kernel_choice.candidates("linear", described["dtype"])}
    assert {tuple(p["shape"]) for p in kernels["linear"]} == described["shapes"]
    assert all(len(p["ranges"]) == len(ROW_RANGES) and {r["variant"] for r in p["ranges"]} <= runnable
               for p in kernels["linear"])
    # stats() says the same in numbers: cells per kernel, one attention kernel.
    linear = {k: v for k, v in stats.items() if k.startswith("kernels_linear_")}
    assert sum(linear.values()) == len(kernels["linear"]) * len(ROW_RANGES)
    assert stats[f"kernels_attention_{kernels['attention']}"] == 1
    assert all(isinstance(v, int) for k, v in stats.items() if k.startswith("kernels_"))


def test_kvmux_kernels_forces_the_avx2_path_in_bf16(tiny, monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV, "linear=avx2,attention=avx2")
    done, stats, described = run(tiny, dtype="bfloat16")
    assert len(done.token_ids) == 4
    assert described["kernels"]["attention"] == "avx2"
    assert stats["kernels_linear_avx2"] == len(described["shapes"]) * len(ROW_RANGES) and stats["kernels_attention_avx2"] == 1
    assert not [k for k in stats if k.startswith("kernels_linear_") and k != "kernels_linear_avx2"]


def test_forcing_a_variant_the_cpu_lacks_fails_at_load_naming_it(tiny, monkeypatch):
    monkeypatch.setattr(kernel_choice, "cpu_features", lambda: {"avx2": True, "fma": True})
    monkeypatch.setenv(kernel_choice.ENV, "linear=amx")
    with pytest.raises(RuntimeError, match="linear kernel 'amx' needs avx512f.*amx_bf16, which this CPU lacks"):
        run(tiny, dtype="bfloat16")
