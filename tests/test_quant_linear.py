"""The int8 kernels over every GGUF block type kvmux keeps, every variant this CPU runs, against float64 references;
the types' decoding against the gguf package's."""
import dataclasses

import pytest
import torch

from kvmux.checks.kernels import QUANT_SHAPES, SUM_ERROR, quant_sum_bound
from kvmux.checks.reference import (
    activation_rounding_bound,
    bf16_rounding_bound,
    dequantize_gguf_f64,
    quant_linear_bf16_f64,
    quant_linear_f64,
    quantize_activations_ref,
    random_gguf_blocks,
)
from kvmux.ops import gguf_blocks, kernel_choice, quant

QTYPES = list(gguf_blocks.FORM_OF)  # GGUF types
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def cols(qtype: str, k: int) -> int:
    """k rounded up to whole blocks of the type (a K-quant's super-blocks hold 256)."""
    values = gguf_blocks.GGUF_BLOCK[qtype][1]
    return -(-k // values) * values


def runnable(variant: str) -> None:
    missing = kernel_choice.variant("linear", variant, "q8_0").missing()
    if missing:
        pytest.skip(f"kernel variant {variant} needs {', '.join(missing)}, which this CPU lacks")


def case(qtype: str, rows: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    raw = random_gguf_blocks(qtype, n, k, g)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, k // 32, 1, generator=g).repeat_interleave(32, 1)[..., 0]
    x[0, :32] = 0.0  # a block of zeros: scale 0
    if rows > 1:
        x[1, 5] = 40.0  # an outlier that sets its block's scale
    return raw, x, torch.randn(n, generator=g)


@pytest.mark.parametrize("variant", list(quant.KERNELS))
@pytest.mark.parametrize("qtype", QTYPES)
def test_kernel_matches_float64_reference(variant, qtype):
    runnable(variant)
    for i, (rows, n, k) in enumerate(QUANT_SHAPES):
        k = cols(qtype, k)
        raw, x, bias = case(qtype, rows, n, k, seed=100 * i + QTYPES.index(qtype))
        weight = quant.pack_blocks(qtype, raw)
        out = quant.quant_linear(x, weight, bias, kernel=variant)
        span = weight.span
        assert span == quant.BLOCKS[weight.qtype] * (4 if qtype in K_QUANTS else 1)
        if variant in quant.BF16_KERNELS:
            # x and the weight rounded to bf16 as the kernel does: float32 sums are what is left.
            ref, magnitude = quant_linear_bf16_f64(qtype, raw, x, bias)
            tol = SUM_ERROR * (magnitude + bias.abs().double())
            rounding = bf16_rounding_bound(qtype, raw, x)
        else:
            # With x quantized exactly as the kernel does, what is left is float32 rounding: a few per block.
            ref, magnitude = quant_linear_f64(qtype, raw, x, bias, span)
            tol = quant_sum_bound(k, magnitude, bias)
            # Against the unquantized product, the activations' rounding (half a step per value) bounds the error.
            rounding = activation_rounding_bound(qtype, raw, x, span)
        err = (out.double() - ref).abs()
        assert (err <= tol).all(), f"{qtype} {variant} {rows}x{n}x{k}: worst {(err / tol).max():.2f} x tolerance"
        exact = x.double() @ dequantize_gguf_f64(qtype, raw).T + bias.double()
        bound = rounding * (1 + 1e-5) + tol
        assert ((out.double() - exact).abs() <= bound).all(), f"{qtype} {variant} {rows}x{n}x{k}"


@pytest.mark.parametrize("qtype", QTYPES)
def test_int8_variants_agree_bit_for_bit(qtype):
    """Every int8 variant computes the same integers and the same floats, a K-quant's spans included, so the
    load-time plan may pick a different one per row range (1 row against a speculative step's 5) without
    changing a model's greedy outputs."""
    variants = [v.name for v in kernel_choice.runnable("linear", "q8_0") if v.name not in quant.BF16_KERNELS]
    if len(variants) < 2:
        pytest.skip(f"one int8 variant runs on this CPU ({', '.join(variants)}): nothing to compare")
    for i, rows in enumerate((1, 2, 5, 17)):
        raw, x, bias = case(qtype, rows, 40, cols(qtype, 512), seed=40 + i)
        weight = quant.pack_blocks(qtype, raw)
        outs = {v: quant.quant_linear(x, weight, bias, kernel=v) for v in variants}
        for v, out in outs.items():
            assert torch.equal(out, outs[variants[0]]), f"{qtype} at {rows} rows: {v} differs from {variants[0]}"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K"])
def test_amx_bf16_over_several_chunks_a_task(qtype):
    """A weight of 129 panels and K = 4096 (128 KB of bf16 a panel): each task dequantizes several chunks into its
    thread's buffer, the last one short, and the last panel is partial."""
    runnable("amx_bf16")
    g = torch.Generator().manual_seed(9)
    raw = random_gguf_blocks(qtype, 2056, 4096, g)
    x = torch.randn(40, 4096, generator=g)
    out = quant.quant_linear(x, quant.pack_blocks(qtype, raw), kernel="amx_bf16")
    ref, magnitude = quant_linear_bf16_f64(qtype, raw, x)
    err, tol = (out.double() - ref).abs(), SUM_ERROR * magnitude + 1e-30
    assert (err <= tol).all(), f"worst {(err / tol).max():.2f} x tolerance"


def test_a_variant_with_other_numbers_takes_its_row_ranges_alone():
    """amx_bf16 rounds x to bf16 where the int8 variants quantize it: ranges timed at 64 rows and up take it
    untimed, the others never see it, so no timing picks it in one run and not in the next."""
    found = [kernel_choice.variant("linear", name, "q4_1") for name in ("avx2", "avx512vnni", "amx_bf16")]
    assert [v.name for v in kernel_choice.at_rows(found, 16)] == ["avx2", "avx512vnni"]
    assert [v.name for v in kernel_choice.at_rows(found, 64)] == ["amx_bf16"]
    assert [v.name for v in kernel_choice.at_rows(found[2:], 1)] == ["amx_bf16"]  # KVMUX_KERNELS forced it
    # Q8_0's int8 tiles take int16 activations: there it takes the ranges from 9 rows (timed at 16).
    bytes16 = [kernel_choice.variant("linear", name, "q8_0") for name in ("avx512vnni", "amx_bf16")]
    assert [v.name for v in kernel_choice.at_rows(bytes16, 16)] == ["amx_bf16"]


@pytest.mark.parametrize("variant", list(quant.KERNELS))
def test_kernel_reads_strided_rows_and_no_bias(variant):
    runnable(variant)
    raw, x, _ = case("q4_1", 7, 64, 96, seed=7)
    wide = torch.zeros(7, 200)
    wide[:, 50:146] = x
    weight = quant.pack_blocks("q4_1", raw)
    torch.testing.assert_close(quant.quant_linear(wide[:, 50:146], weight, kernel=variant),
                               quant.quant_linear(x, weight, kernel=variant), rtol=0, atol=0)
    assert quant.quant_linear(x[:0], weight, kernel=variant).shape == (0, 64)


@pytest.mark.parametrize("span", ["block", 128])
@pytest.mark.parametrize("form", quant.QTYPES)
def test_activations_quantized_as_the_reference_says(form, span):
    """The quants and scales, and each block's correction: -offset * sum of its quants (the integer dot's start)
    for the forms with an offset, d * sum (its min's weight, in float32) for the forms with mins; per block, or
    with the scale taken over a span of blocks (the K-quants')."""
    g = torch.Generator().manual_seed(3)
    bits, block = quant.ACTIVATION_BITS[form], quant.BLOCKS[form]
    span = block if span == "block" else span
    levels = 2 ** (bits - 1) - 1
    x = torch.randn(6, 128, generator=g) * 3
    x[:, 64:] *= 0.01  # blocks far below their span's amax
    x[2, 32:64] = 0.0
    x[3, :32] = 0.0
    x[3, :5] = torch.tensor([levels, 2.5, 3.5, -2.5, levels - 0.5])  # amax = L: scale 1, exact ties
    q, d = quantize_activations_ref(x, bits, block, span)
    assert q[3, :5].tolist() == [levels, 2, 4, -2, levels - 1]  # round half to even
    assert (d.reshape(6, -1, span // block) == d.reshape(6, -1, span // block)[..., :1]).all()
    nb = 128 // block
    nq = torch.empty(6, 128, dtype=torch.int8 if bits == 8 else torch.int16)
    nd, offsets, min_weights = torch.empty(6, nb), torch.zeros(6, nb, dtype=torch.int32), torch.zeros(6, nb)
    quant._native.quantize_activations(x.data_ptr(), 6, 128, 128, quant.QTYPES[form], span, nq.data_ptr(),
                                       nd.data_ptr(), offsets.data_ptr(), min_weights.data_ptr())
    assert torch.equal(nq.float(), q) and torch.equal(nd, d)
    sums = q.reshape(6, nb, block).sum(-1).int()
    assert torch.equal(offsets, -gguf_blocks.OFFSET.get(form, 0) * sums if form in gguf_blocks.OFFSET
                       else torch.zeros_like(sums))
    assert torch.equal(min_weights, d * sums.float() if form in ("q4_1", "q5_1") else torch.zeros_like(d))


@pytest.mark.parametrize("qtype", QTYPES)
def test_packed_blocks_dequantize_to_the_files_values(qtype):
    """Rows read back from the panels equal the GGUF blocks' values: the gguf package's decoding, and float64's."""
    import gguf

    g = torch.Generator().manual_seed(11)
    raw = random_gguf_blocks(qtype, 37, cols(qtype, 96), g)  # 37 rows: a partial last panel
    weight = quant.pack_blocks(qtype, raw)
    # Bytes per 32 weights, 48 rows with the last panel's padding: the file's own for Q8_0, Q4_0, Q4_1, Q5_0 and
    # Q5_1; Q4_K and Q5_K take Q4_1's and Q5_1's (a scale and min per 32 rather than 6-bit ones per super-block),
    # Q6_K its 6 bits and an fp16 scale per 16 (the file 26.25: an int8 scale per 16).
    per_32 = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 20, "Q5_K": 24, "Q6_K": 28}
    assert weight.nbytes == 48 * weight.in_features // 32 * per_32[qtype]
    theirs = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, qtype)))
    if qtype in K_QUANTS:  # sub-block scales (and mins) held as fp16 products: each within 2^-11 of the product
        parts = gguf_blocks.decode(qtype, raw)
        size = quant.BLOCKS[parts.form]
        m = torch.zeros_like(theirs) if parts.m is None else parts.m.float().repeat_interleave(size, 1)
        bound = 2.0 ** -11 * (theirs.abs() + 2 * m.abs()) * 1.001 + 1e-9
        assert ((weight.dequantize() - theirs).abs() <= bound).all()
    else:
        assert torch.equal(weight.dequantize(), theirs)
    assert torch.equal(weight.dequantize().double(), dequantize_gguf_f64(qtype, raw))
    ids = torch.tensor([36, 0, 17, 17, 5])
    assert torch.equal(weight.rows(ids), weight.dequantize()[ids])
    for bad in (37, -1):  # the padding rows of the last panel are not rows
        with pytest.raises(IndexError, match=f"row {bad} is out of range: the weight has 37 rows"):
            weight.rows(torch.tensor([0, bad]))
    with pytest.raises(ValueError, match=r"need 1-D ids, got shape \(2, 2\)"):
        weight.rows(ids[:4].view(2, 2))


def test_q8_0_quantization_of_float_weights_is_within_half_a_step():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 64, generator=g)
    got = quant.quantize_q8_0(w).dequantize()
    step = w.reshape(48, 2, 32).abs().amax(-1, keepdim=True) / 127
    # fp16 scales: half a step of rounding, plus the scale's own relative error (2^-11) on values up to 127 steps.
    assert ((got - w).reshape(48, 2, 32).abs() <= step * (0.5 + 127 * 2 ** -11)).all()


@pytest.mark.parametrize("types", [("Q6_K",), ("Q5_0", "Q8_0")])
def test_packing_a_step_at_a_time_gives_the_same_panels(types, monkeypatch):
    g = torch.Generator().manual_seed(3)
    parts = [(t, random_gguf_blocks(t, rows, 256, g)) for t, rows in zip(types, (40, 9))]
    form = gguf_blocks.common_form(list(types))
    whole = quant.pack_parts(parts, form)
    monkeypatch.setattr(quant, "PACK_WEIGHTS", 1)  # a panel per step
    stepped = quant.pack_parts(parts, form)
    for a, b in ((whole.quants, stepped.quants), (whole.scales, stepped.scales), (whole.mins, stepped.mins)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_an_out_buffer_is_filled_as_a_new_output_would_be():
    """plan_shape's timing hands every call of a shape one output buffer."""
    g = torch.Generator().manual_seed(2)
    layer, x = quant.QuantLinear(quant.pack_blocks("q8_0", random_gguf_blocks("q8_0", 16, 64, g))), torch.randn(3, 64)
    out = torch.full((3, 16), float("nan"))
    assert layer(x, out=out) is out
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[3, 16\]"):
        layer(x, out=torch.empty(16, 3).T)


def test_bad_inputs_are_refused_with_what_was_wrong():
    g = torch.Generator().manual_seed(1)
    weight = quant.pack_blocks("q8_0", random_gguf_blocks("q8_0", 16, 64, g))
    with pytest.raises(ValueError, match=r"float32 \[rows, 64\]"):
        quant.quant_linear(torch.randn(2, 32), weight)
    with pytest.raises(ValueError, match="float32"):
        quant.quant_linear(torch.randn(2, 64).double(), weight)
    with pytest.raises(ValueError, match="bias"):
        quant.quant_linear(torch.randn(2, 64), weight, torch.randn(15))
    with pytest.raises(ValueError, match="no kernel variant 'sse2'"):
        quant.quant_linear(torch.randn(2, 64), weight, kernel="sse2")
    x, out = torch.randn(2, 64), torch.empty(2, 16)
    args = list(quant.QuantLinear(weight).weight_args)
    for span in (0, 48, 128):  # none, not whole blocks, past the row
        message = rf"span must be a multiple of the block \(32\) dividing in_features \(64\), got {span}"
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(weight, span=span)
        args[4] = span  # and the native call, should a caller bypass QuantWeight
        with pytest.raises(ValueError, match=message):
            quant._native.quant_linear(x.data_ptr(), 2, 64, 64, *args, out.data_ptr(), 16, 0, 1)
    q6 = quant.pack_blocks("q6_k", random_gguf_blocks("Q6_K", 16, 256, g))  # blocks of 16, K still in 32s
    with pytest.raises(ValueError, match="in_features must be a multiple of 32, got 48"):
        dataclasses.replace(q6, in_features=48, span=48)
    args6 = list(quant.QuantLinear(q6).weight_args)
    args6[4] = 48
    with pytest.raises(ValueError, match="in_features must be a multiple of 32, got 48"):
        quant._native.quant_linear(x.data_ptr(), 2, 48, 64, *args6, out.data_ptr(), 16, 0, 1)
    with pytest.raises(ValueError, match="not one kvmux multiplies"):
        quant.pack_blocks("q2_k", torch.zeros(16, 84, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        quant.pack_blocks("q4_0", torch.zeros(16, 19, dtype=torch.uint8))


def test_a_variant_the_cpu_lacks_is_refused_naming_the_instruction_set(monkeypatch):
    # A CPU without VNNI: only the AVX2 variant runs, and asking for a VNNI one names what is missing.
    plain = {**kernel_choice.cpu_features(), "avx512vnni": False, "avxvnni": False, "amx_tile": False,
             "amx_int8": False, "amx_bf16": False}
    monkeypatch.setattr(kernel_choice, "cpu_features", lambda: plain)
    monkeypatch.setattr(quant, "runnable_kernels", lambda: frozenset({"avx2"}))
    assert [v.name for v in kernel_choice.candidates("linear", "q4_1")] == ["avx2"]
    weight = quant.pack_blocks("q8_0", torch.zeros(16, 34, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="needs avxvnni"):
        quant.quant_linear(torch.randn(1, 32), weight, kernel="avxvnni")
    monkeypatch.setenv(kernel_choice.ENV, "linear=avx512vnni")
    with pytest.raises(RuntimeError, match="needs (.*, )?avx512vnni"):  # and avx512f ... where AVX-512 is missing too
        kernel_choice.candidates("linear", "q8_0")
