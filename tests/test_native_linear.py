"""The native small-batch linear against a float64 torch reference on fresh random inputs."""
import pytest
import torch

from kvmux.linear import MAX_NATIVE_ROWS, linear, small_linear


@pytest.mark.parametrize("rows,in_features,out_features", [
    (1, 576, 960), (3, 576, 1536), (4, 1536, 576), (5, 577, 1001), (13, 64, 7), (MAX_NATIVE_ROWS, 40, 50),
    (2, 7, 1), (1, 1, 1),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(rows, in_features, out_features, with_bias):
    gen = torch.Generator().manual_seed(rows * 7919 + in_features * 31 + out_features)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    ref = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    out = small_linear(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    # float32 accumulation over in_features products of unit normals.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * in_features ** 0.5 * 4)


def test_strided_rows_are_read_in_place():
    base = torch.randn(6, 100)
    x = base[:, 10:74]  # rows 100 apart, 64 features each
    weight = torch.randn(33, 64)
    torch.testing.assert_close(small_linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-4)


def test_linear_dispatch_keeps_results_across_the_row_threshold():
    weight = torch.randn(96, 80)
    for rows in (1, MAX_NATIVE_ROWS, MAX_NATIVE_ROWS + 1, 200):
        x = torch.randn(rows, 80)
        torch.testing.assert_close(linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-4)


def test_other_dtypes_go_to_torch():
    x, weight = torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    assert linear(x, weight).dtype == torch.bfloat16


@pytest.mark.parametrize("x,weight,bias,match", [
    (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), None, "float32"),
    (torch.randn(2, 8), torch.randn(8, 4).T, None, "contiguous"),
    (torch.randn(8, 2).T, torch.randn(4, 8), None, "contiguous rows"),
    (torch.randn(2, 8), torch.randn(4, 9), None, "does not take 8 input features"),
    (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "bias"),
])
def test_bad_arguments_raise(x, weight, bias, match):
    with pytest.raises(ValueError, match=match):
        small_linear(x, weight, bias)
