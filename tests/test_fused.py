"""Native fused layer kernels against the torch formulation in float64, on fresh random inputs."""
import pytest
import torch
import torch.nn.functional as F

from kvmux.ops import fused


def _gen(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) & 0xFFFF_FFFF)


def _rms_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, weight = x.double(), weight.double()
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (300, 576), (3, 13)])
def test_rms_norm(rows, hidden):
    gen = _gen(rows, hidden)
    wide = torch.randn(rows, hidden + 5, generator=gen) * 3
    x = wide[:, 2:2 + hidden]  # strided rows, as a column slice
    weight = torch.randn(hidden, generator=gen)
    out = fused.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(out.double(), _rms_ref(x, weight, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (300, 576), (5, 37)])
def test_add_rms_norm_updates_the_residual(rows, hidden):
    gen = _gen(rows, hidden, 1)
    x, residual = torch.randn(rows, hidden, generator=gen), torch.randn(rows, hidden, generator=gen)
    weight = torch.randn(hidden, generator=gen)
    expected_residual = residual.double() + x.double()
    out, new_residual = fused.add_rms_norm(x, residual.clone(), weight, 1e-6)
    torch.testing.assert_close(new_residual.double(), expected_residual, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), _rms_ref(expected_residual, weight, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,q_heads,kv_heads,head_dim", [(1, 9, 3, 64), (40, 4, 2, 16), (3, 2, 1, 6)])
def test_rope_inplace_matches_the_torch_rotation(rows, q_heads, kv_heads, head_dim):
    gen = _gen(rows, q_heads, head_dim)
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim, generator=gen)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = fused.rope_tables(positions, inv_freq, torch.float32)
    q_end, k_end = q_heads * head_dim, (q_heads + kv_heads) * head_dim
    q = qkv[:, :q_end].reshape(rows, q_heads, head_dim).double()
    k = qkv[:, q_end:k_end].reshape(rows, kv_heads, head_dim).double()
    v = qkv[:, k_end:].clone()
    ref_q = fused.apply_rope(q, cos.double(), sin.double())
    ref_k = fused.apply_rope(k, cos.double(), sin.double())
    assert fused.rope_inplace(qkv, q_heads + kv_heads, head_dim, cos, sin)
    torch.testing.assert_close(qkv[:, :q_end].double(), ref_q.reshape(rows, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, q_end:k_end].double(), ref_k.reshape(rows, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, k_end:], v)  # v is left alone


def test_apply_rope_is_hugging_faces_rotation():
    gen = _gen(99)
    x = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64)
    freqs = torch.rand(5, 4, generator=gen, dtype=torch.float64) * 10
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    rotated = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    torch.testing.assert_close(fused.apply_rope(x, freqs.cos(), freqs.sin()), x * emb.cos() + rotated * emb.sin())


@pytest.mark.parametrize("rows,inter", [(1, 1536), (64, 1536), (9, 11)])
def test_silu_mul(rows, inter):
    gen = _gen(rows, inter)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 6  # wide enough to reach both tails of the sigmoid
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    ref = F.silu(gate_up[:, :inter].double()) * gate_up[:, inter:].double()
    torch.testing.assert_close(fused.silu_mul(gate_up).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,inter", [(1, 2048), (64, 2048), (9, 11)])
def test_gelu_tanh_mul(rows, inter):
    gen = _gen(rows, inter, 2)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 4
    gate_up[0, :6] = torch.tensor([-100.0, 100.0, 0.0, -0.0, 1e-4, -3e-3])  # the tails, and tanh's cancellation
    ref = F.gelu(gate_up[:, :inter].double(), approximate="tanh") * gate_up[:, inter:].double()
    torch.testing.assert_close(fused.gelu_tanh_mul(gate_up).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,q_heads,kv_heads,head_dim", [(1, 4, 1, 256), (40, 4, 2, 16), (3, 2, 1, 6)])
def test_norm_rope_inplace_norms_each_head_then_rotates(rows, q_heads, kv_heads, head_dim):
    gen = _gen(rows, q_heads, head_dim, 3)
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim, generator=gen) * 3
    q_weight, k_weight = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = fused.rope_tables(positions, inv_freq, torch.float32)
    q_end, k_end = q_heads * head_dim, (q_heads + kv_heads) * head_dim
    q = _rms_ref(qkv[:, :q_end].reshape(rows, q_heads, head_dim), q_weight, 1e-6)
    k = _rms_ref(qkv[:, q_end:k_end].reshape(rows, kv_heads, head_dim), k_weight, 1e-6)
    ref_q, ref_k = (fused.apply_rope(t, cos.double(), sin.double()).reshape(rows, -1) for t in (q, k))
    v = qkv[:, k_end:].clone()
    assert fused.norm_rope_inplace(qkv, q_heads, kv_heads, head_dim, (q_weight, 1e-6), (k_weight, 1e-6), cos, sin)
    torch.testing.assert_close(qkv[:, :q_end].double(), ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, q_end:k_end].double(), ref_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, k_end:], v)
    # A weight not yet final (a Gemma norm before packing) leaves the rows alone, for the torch path.
    before = qkv.clone()
    assert not fused.norm_rope_inplace(qkv, q_heads, kv_heads, head_dim, (None, 1e-6), (k_weight, 1e-6), cos, sin)
    assert torch.equal(qkv, before)


def test_other_dtypes_keep_the_torch_path():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    weight = torch.ones(16, dtype=torch.bfloat16)
    assert fused.rms_norm(x, weight, 1e-5).dtype == torch.bfloat16
    assert fused.silu_mul(torch.randn(4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert fused.gelu_tanh_mul(torch.randn(4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    cos, sin = torch.ones(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16)
    assert not fused.rope_inplace(torch.randn(4, 32, dtype=torch.bfloat16), 2, 16, cos, sin)
