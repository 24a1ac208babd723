"""The packed linear's layouts and argument checks, and the kernel plan (every variant's numerics are checked
against float64 in test_kernel_checks.py)."""
import pytest
import torch

from kvmux.ops import kernel_choice
from kvmux.ops.linear import (
    K_ALIGN,
    PANEL,
    ROW_RANGES,
    Dispatch,
    PackedLinear,
    pack_weight,
    packed_linear,
    packed_rows,
    plan_linears,
)


def test_float32_panels_interleave_features_along_k():
    weight = torch.randn(PANEL + 3, 5)
    packed = pack_weight(weight)
    assert packed.shape == (2, 5, PANEL) and packed.dtype == torch.float32
    assert torch.equal(packed[1, :, 2], weight[PANEL + 2])
    assert not packed[1, :, 3:].any()


def test_bf16_panels_hold_pairs_along_k_padded_to_the_tile_depth():
    weight = torch.randn(PANEL + 3, 37).bfloat16()
    packed = pack_weight(weight)
    kp = 2 * K_ALIGN  # 37 rounded up
    assert packed.shape == (2, kp // 2, PANEL, 2) and packed.dtype == torch.bfloat16
    # Row 5 of panel 1 holds k = 10 and 11 of each feature, side by side.
    assert torch.equal(packed[1, 5, 2], weight[PANEL + 2, 10:12])
    assert torch.equal(packed[1, 18, :3, 0], weight[PANEL:, 36]) and not packed[1, 18, :3, 1].any()  # k = 37 > K
    assert not packed[1, 19:, :3].any()  # past K
    assert not packed[1, :, 3:].any()  # past N


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_come_back_from_the_packed_weight(dtype):
    weight = torch.randn(37, 24).to(dtype)
    ids = torch.tensor([0, 36, 5, 5, 17])
    assert torch.equal(packed_rows(pack_weight(weight), ids, 24), weight[ids])


def test_strided_and_empty_inputs():
    weight = torch.randn(33, 64)
    packed = pack_weight(weight)
    base = torch.randn(6, 100)
    x = base[:, 10:74]  # rows 100 apart, 64 features each
    torch.testing.assert_close(packed_linear(x, packed, 33), x @ weight.T, rtol=1e-5, atol=1e-4)
    columns = torch.randn(64, 6).T  # not unit-stride along features
    torch.testing.assert_close(packed_linear(columns, packed, 33), columns @ weight.T, rtol=1e-5, atol=1e-4)
    assert packed_linear(torch.empty(0, 64), packed, 33).shape == (0, 33)


def test_an_out_buffer_is_filled_as_a_new_output_would_be():
    """plan_shape's timing hands every call of a shape one output buffer."""
    layer, x = PackedLinear(pack_weight(torch.randn(33, 64)), 64, 33), torch.randn(5, 64)
    out = torch.full((5, 33), float("nan"))
    assert layer(x, out=out) is out
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[5, 33\]"):
        layer(x, out=torch.empty(5, 34)[:, :33])


@pytest.mark.parametrize("x,out_features,bias,match", [
    (torch.randn(2, 8, dtype=torch.float64), 4, None, "float32"),
    (torch.randn(2, 9), 4, None, "not a packed CPU weight of 4 x 9"),
    (torch.randn(2, 8), 40, None, "not a packed CPU weight of 40 x 8"),
    (torch.randn(2, 8), 4, torch.randn(5), "bias"),
])
def test_bad_arguments_raise(x, out_features, bias, match):
    with pytest.raises(ValueError, match=match):
        packed_linear(x, pack_weight(torch.randn(4, 8)), out_features, bias)


def test_a_kernel_must_take_the_panels_dtype():
    from kvmux import _native

    with pytest.raises(ValueError, match="does not take torch.float32 panels"):
        packed_linear(torch.randn(2, 8), pack_weight(torch.randn(4, 8)), 4, kernel=_native.LinearKernel.bf16_amx)


def test_only_float32_and_bf16_weights_are_packed():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pack_weight(torch.randn(4, 8, dtype=torch.float16))


def layers(n: int, out_features: int, in_features: int, dtype: torch.dtype):
    from types import SimpleNamespace

    return [SimpleNamespace(weight=pack_weight(torch.randn(out_features, in_features).to(dtype)), bias=None,
                            dense=None, in_features=in_features, out_features=out_features,
                            weight_format=str(dtype).removeprefix("torch.")) for _ in range(n)]


def test_the_plan_times_every_candidate_per_row_range_and_dispatches_by_rows():
    group, other = layers(3, 40, 24, torch.bfloat16), layers(1, 16, 24, torch.bfloat16)
    plans = plan_linears(group + other)
    assert [(p.out_features, p.in_features, p.layers) for p in plans] == [(40, 24, 3), (16, 24, 1)]
    runnable = {v.name for v in kernel_choice.candidates("linear", "bfloat16")}
    timed = runnable if len(runnable) > 1 else set()  # a CPU with one candidate (AVX2 only) has nothing to time
    for plan in plans:
        assert len(plan.variants) == len(ROW_RANGES) and set(plan.variants) <= runnable
        assert all(set(m) == timed and (not m or next(iter(m)) == v) for m, v in zip(plan.micros, plan.variants))
    # Whatever won, each row count goes to its range's kernel and gets the right product.
    x = torch.randn(300, 24)
    for layer in group:
        assert isinstance(layer.dispatch, Dispatch)
        dense = packed_rows(layer.weight, torch.arange(40), 24).float()
        for rows in (1, 2, 3, 8, 9, 33, 129, 300):
            torch.testing.assert_close(layer.dispatch(x[:rows]), x[:rows] @ dense.T, atol=0.2, rtol=0.02)
        assert layer.dense is None  # oneDNN is no automatic candidate: no [N, K] copy


def test_kvmux_kernels_pins_the_plan(monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV, "linear=avx2")
    (plan,) = plan_linears(layers(2, 40, 24, torch.bfloat16))
    assert plan.variants == ["avx2"] * len(ROW_RANGES) and plan.micros == [{}] * len(ROW_RANGES)
    # oneDNN only when named; then each layer keeps the [N, K] copy it reads.
    monkeypatch.setenv(kernel_choice.ENV, "linear=onednn")
    group = layers(2, 40, 24, torch.bfloat16)
    (plan,) = plan_linears(group)
    assert plan.variants == ["onednn"] * len(ROW_RANGES)
    assert all(layer.dense.shape == (40, 24) and layer.dense.dtype == torch.bfloat16 for layer in group)
    monkeypatch.setenv(kernel_choice.ENV, "linear=amx")
    with pytest.raises(ValueError, match="takes bfloat16, q8_0, .*, not float32"):
        plan_linears(layers(1, 40, 24, torch.float32))
    monkeypatch.setenv(kernel_choice.ENV, "linear=sse2")
    with pytest.raises(ValueError, match="linear has no variant 'sse2'"):
        plan_linears(layers(1, 40, 24, torch.float32))


def test_a_forced_variant_the_cpu_lacks_names_the_instruction_set(monkeypatch):
    monkeypatch.setattr(kernel_choice, "cpu_features", lambda: {"avx2": True, "fma": True})
    monkeypatch.setenv(kernel_choice.ENV, "linear=amx")
    with pytest.raises(RuntimeError, match="needs avx512f, avx512bw, avx512vl, avx512bf16, amx_tile, amx_bf16"):
        plan_linears(layers(1, 40, 24, torch.bfloat16))
    monkeypatch.delenv(kernel_choice.ENV)
    assert [v.name for v in kernel_choice.candidates("linear", "bfloat16")] == ["avx2"]
    assert [v.name for v in kernel_choice.runnable("linear", "bfloat16")] == ["avx2", "onednn"]


def test_one_variant_name_has_an_entry_per_format(monkeypatch):
    """avx2 names the float kernel and the quantized one: KVMUX_KERNELS=linear=avx2 pins each format to its own,
    and a format no avx2 entry takes is named."""
    floats = kernel_choice.variant("linear", "avx2", "bfloat16")
    quantized = kernel_choice.variant("linear", "avx2", "q4_1")
    assert floats.formats == ("float32", "bfloat16") and quantized.formats == kernel_choice.QUANT_FORMATS
    monkeypatch.setenv(kernel_choice.ENV, "linear=avx2")
    assert kernel_choice.candidates("linear", "q4_1") == [quantized]
    assert kernel_choice.candidates("linear", "float32") == [floats]
    with pytest.raises(ValueError, match="'avx2' takes float32, bfloat16, q8_0, .*, q6_k, not int8"):
        kernel_choice.candidates("linear", "int8")
    monkeypatch.setenv(kernel_choice.ENV, "linear=amx")  # the bf16 AMX kernel and the quantized one
    with pytest.raises(ValueError, match="'amx' takes bfloat16, q8_0, .*, not float32"):
        kernel_choice.candidates("linear", "float32")


def test_a_malformed_kvmux_kernels_is_named(monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV, "linear")
    with pytest.raises(ValueError, match="'linear' is not op=variant"):
        kernel_choice.forced("linear")
