"""The packed linear (float32 and bf16 panels) against a float64 torch reference on fresh random inputs."""
import pytest
import torch

from kvmux.ops.linear import PANEL, pack_weight, packed_linear, packed_rows


@pytest.mark.parametrize("rows,in_features,out_features", [
    # Decode and prefill shapes, odd sizes that leave partial row tiles and a partial last panel, K split
    # into several passes (1536, 1300), more rows than one row block (200), and the 1 x 1 corner.
    (1, 576, 960), (3, 576, 1536), (4, 1536, 576), (5, 577, 1001), (13, 64, 7), (64, 1300, 50), (200, 40, 50),
    (2, 7, 1), (1, 1, 1),
])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(rows, in_features, out_features, with_bias, weight_dtype):
    gen = torch.Generator().manual_seed(rows * 7919 + in_features * 31 + out_features)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen).to(weight_dtype)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    # bf16 weights are exact in float64 too: only the kernel's float32 accumulation differs.
    ref = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    out = packed_linear(x, pack_weight(weight), out_features, bias)
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    # float32 accumulation over in_features products of unit normals.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * in_features ** 0.5 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_layout_and_padding(dtype):
    weight = torch.randn(PANEL + 3, 5).to(dtype)
    packed = pack_weight(weight)
    assert packed.shape == (2, 5, PANEL) and packed.dtype == dtype
    assert torch.equal(packed[1, :, 2], weight[PANEL + 2])
    assert torch.equal(packed[1, :, 3:], torch.zeros(5, PANEL - 3, dtype=dtype))


def test_rows_come_back_from_the_packed_weight():
    weight = torch.randn(37, 24)
    ids = torch.tensor([0, 36, 5, 5, 17])
    assert torch.equal(packed_rows(pack_weight(weight), ids), weight[ids])


def test_strided_and_empty_inputs():
    weight = torch.randn(33, 64)
    packed = pack_weight(weight)
    base = torch.randn(6, 100)
    x = base[:, 10:74]  # rows 100 apart, 64 features each
    torch.testing.assert_close(packed_linear(x, packed, 33), x @ weight.T, rtol=1e-5, atol=1e-4)
    columns = torch.randn(64, 6).T  # not unit-stride along features
    torch.testing.assert_close(packed_linear(columns, packed, 33), columns @ weight.T, rtol=1e-5, atol=1e-4)
    assert packed_linear(torch.empty(0, 64), packed, 33).shape == (0, 33)


@pytest.mark.parametrize("x,out_features,bias,match", [
    (torch.randn(2, 8, dtype=torch.float64), 4, None, "float32"),
    (torch.randn(2, 9), 4, None, r"\[rows, 8\]"),
    (torch.randn(2, 8), 40, None, "not a packed CPU weight of 40 output features"),
    (torch.randn(2, 8), 4, torch.randn(5), "bias"),
])
def test_bad_arguments_raise(x, out_features, bias, match):
    with pytest.raises(ValueError, match=match):
        packed_linear(x, pack_weight(torch.randn(4, 8)), out_features, bias)


def test_only_float32_and_bf16_weights_are_packed():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pack_weight(torch.randn(4, 8, dtype=torch.float16))
