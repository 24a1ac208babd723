"""Quantized models: a tiny GGUF written here (gguf's GGUFWriter) loads with its blocks kept, holds exactly the
weights transformers dequantizes, and generates what the dequantized model would."""
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from kvmux.model.llama import Linear
from kvmux.model.loader import load_model
from kvmux.ops import kernel_choice, quant
from kvmux.ops.gguf_blocks import GGUF_BLOCK

from engine_helpers import MAX_NEW, PROMPTS, greedy, run_engine, teacher_forced_logits
from tiny_gguf import matmuls_as, write_tiny_gguf

KEPT = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
MATMULS = 9  # 2 layers x (qkv, o, gate_up, down) + the tied embedding

pytestmark = pytest.mark.usefixtures("scratch_cache")


@pytest.fixture(scope="module")
def ggufs(tiny, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("gguf")
    files = {name: str(write_tiny_gguf(tiny, folder / f"{name}.gguf", matmuls_as(t))) for name, t in KEPT.items()}
    # A mix: q and k in Q4_1 but v in Q5_0 (no form holds both exactly, so the merged qkv runs as two matmuls);
    # the MLP's down projection in F16 (no kernel: float); the rest in types kvmux keeps.
    mixed = {"q_proj": QT.Q4_1, "k_proj": QT.Q4_1, "v_proj": QT.Q5_0, "o_proj": QT.Q4_1, "gate_proj": QT.Q8_0,
             "up_proj": QT.Q8_0, "down_proj": QT.F16, "embed_tokens": QT.Q4_0}
    files["mixed"] = str(write_tiny_gguf(tiny, folder / "mixed.gguf", lambda name: next(
        (t for part, t in mixed.items() if f".{part}." in name), QT.F32)))
    return files


@pytest.mark.parametrize("qtype", list(KEPT))
def test_gguf_blocks_stay_quantized_and_are_the_files_weights(ggufs, qtype):
    kept = load_model(ggufs[qtype], progress=False)  # quantization="auto"
    dense = load_model(ggufs[qtype], quantization="none", progress=False)  # transformers dequantizes
    linears = [m for m in kept.model.modules() if isinstance(m, Linear)]
    assert len(linears) == MATMULS and all(m.weight is None and m.quant.qtype == qtype for m in linears)
    assert kept.quantization["matmuls"] == {qtype: MATMULS} and not kept.quantization["dequantized"]
    # Each shape's kernels were timed among the variants this CPU runs for the blocks' format.
    plans = kept.model.kernel_choices()["linear"]
    assert {p["dtype"] for p in plans} == {qtype}
    assert {r["variant"] for p in plans for r in p["ranges"]} <= quant.runnable_kernels()
    # The blocks' own bytes: 34, 18 or 20 per 32 weights, never a float copy.
    numel = sum(m.out_features * m.in_features for m in linears)
    assert sum(m.quant.nbytes for m in linears) == numel // 32 * GGUF_BLOCK[qtype.upper()][0]
    # Exactly transformers' dequantized weights (q/k rows un-permuted as it does), norms included.
    ours, theirs = kept.model.hf_parameters(), dense.model.hf_parameters()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name].float(), theirs[name].float()), name
    assert kept.config == dense.config


@pytest.mark.parametrize("qtype", list(KEPT))
def test_quantized_greedy_agrees_with_dequantized_loading(ggufs, qtype):
    """The engine's greedy continuations on the kept blocks, scored by the dequantized model on the same tokens:
    it would have chosen the same token nearly always, and where not, the two were close to a tie."""
    done, _ = run_engine(ggufs[qtype], PROMPTS, greedy(MAX_NEW), block_size=16, num_blocks=128)
    reference = load_model(ggufs[qtype], quantization="none", progress=False).model
    agree = total = 0
    worst = 0.0
    for prompt, completion in zip(PROMPTS, done):
        assert len(completion.token_ids) == MAX_NEW
        logits = teacher_forced_logits(reference, prompt + completion.token_ids)[len(prompt) - 1:-1]
        chosen = torch.tensor(completion.token_ids)
        agree += int((logits.argmax(-1) == chosen).sum())
        total += len(chosen)
        worst = max(worst, float((logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0]).max()))
    # Measured: 96-99% agreement, the worst choice 0.03 below the best, on logits of std ~0.8 (a random model has
    # many near ties). A wrong kernel, scale or row order lands far outside.
    assert agree / total >= 0.9, f"{qtype}: greedy agreement {agree / total:.1%}"
    assert worst < 0.15, f"{qtype}: a token {worst:.3f} below the dequantized model's best"


def test_mixed_file_keeps_what_it_can_and_dequantizes_the_rest(ggufs, caplog):
    with caplog.at_level("WARNING"):
        kept = load_model(ggufs["mixed"], progress=False)
    assert "F16" in caplog.text and "Q5_0" not in caplog.text
    q = kept.quantization
    # Per layer: q|k in Q4_1 and v in Q5_0 (qkv in two pieces), o in Q4_1, gate|up in Q8_0, down float.
    assert q["matmuls"] == {"float32": 2, "q4_1": 4, "q5_0": 2, "q8_0": 2, "q4_0": 1}
    assert q["dequantized"] == {f"blk.{i}.ffn_down.weight": "F16" for i in range(2)}
    layer = kept.model.model.layers[0]
    qkv = layer.self_attn.qkv_proj
    assert qkv.quant is None and [p.quant.qtype for p in qkv.pieces] == ["q4_1", "q5_0"]
    assert [p.out_features for p in qkv.pieces] == [64 + 32, 32]  # q: 4 heads of 16, k and v: 2 of 16
    assert layer.self_attn.o_proj.quant.qtype == "q4_1"
    assert layer.mlp.gate_up_proj.quant.qtype == "q8_0" and kept.model.model.embed_tokens.quant.qtype == "q4_0"
    plans = kept.model.kernel_choices()["linear"]
    assert {"q4_1", "q5_0"} <= {p["dtype"] for p in plans}  # each piece got its own kernels
    dense = load_model(ggufs["mixed"], quantization="none", progress=False)
    ours, theirs = kept.model.hf_parameters(), dense.model.hf_parameters()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # The pieces' outputs side by side are the merged matmul's: logits as the dequantized model's, up to the
    # int8 activations of the quantized kernels.
    ids = PROMPTS[-1]
    ours, theirs = teacher_forced_logits(kept.model, ids), teacher_forced_logits(dense.model, ids)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    assert (ours - theirs).abs().max() < 0.25 * theirs.std()  # measured 0.07; pieces out of order: several


def test_every_int8_kernel_gives_the_same_logits(ggufs, monkeypatch):
    """Every int8 variant does the same integer arithmetic and the same float operations per output (the bf16
    ones, quant.BF16_KERNELS, round x to bf16 instead: not compared)."""
    ids = PROMPTS[-1]
    logits = {}
    for v in kernel_choice.runnable("linear", "q4_1"):
        if v.name in quant.BF16_KERNELS:
            continue
        monkeypatch.setenv(kernel_choice.ENV, f"linear={v.name}")
        forced = load_model(ggufs["q4_1"], progress=False)
        assert {r["variant"] for p in forced.model.kernel_choices()["linear"] for r in p["ranges"]} == {v.name}
        logits[v.name] = teacher_forced_logits(forced.model, ids)
    for name, got in logits.items():
        assert torch.equal(got, logits["avx2"]), f"{name} differs from avx2"


def test_q8_0_quantizes_a_safetensors_model(tiny, reference):
    loaded = load_model(tiny, quantization="q8_0", progress=False)
    assert loaded.quantization["matmuls"] == {"q8_0": MATMULS}
    done, _ = run_engine(tiny, PROMPTS, greedy(MAX_NEW), quantization="q8_0", block_size=16, num_blocks=128)
    first = sum(c.token_ids[0] == r[0] for c, r in zip(done, reference))
    assert first >= len(PROMPTS) - 2, f"only {first} of {len(PROMPTS)} first tokens match transformers' fp32"


def test_q8_0_requantizes_a_gguf(ggufs):
    loaded = load_model(ggufs["mixed"], quantization="q8_0", progress=False)
    assert loaded.quantization["matmuls"] == {"q8_0": MATMULS} and not loaded.quantization["dequantized"]
    dense = load_model(ggufs["mixed"], quantization="none", progress=False).model.hf_parameters()
    ours = loaded.model.hf_parameters()
    for name, w in dense.items():
        if w.dim() == 2:  # Q8_0 of the file's values: within half a step (amax / 254) plus fp16 scale rounding
            step = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            err = (ours[name] - w).reshape(w.shape[0], -1, 32).abs()
            assert (err <= step * (0.5 + 127 * 2 ** -11)).all(), name


def test_quantization_is_checked():
    with pytest.raises(ValueError, match="quantization must be one of auto, none, q8_0"):
        load_model(None, quantization="q4_k")
    with pytest.raises(ValueError, match="CPU kernels only"):
        load_model(None, quantization="q8_0", device="cuda")
