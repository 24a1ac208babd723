"""Random-weight GGUF files of real models' shapes, so that speed claims are also checked at the sizes users run.

    python -m bench.real_shapes llama-3.2-1b --qtype q4_0            # writes bench/models/llama-3.2-1b.q4_0.gguf
    python -m bench.real_shapes qwen2.5-0.5b llama-3.2-3b --qtype q8_0 --out /tmp/models
    python -m bench.real_shapes llama-3.2-1b --qtype q4_k_m    # the mix llama.cpp's Q4_K_M files have

Each file has the named model's layer count, hidden size, heads, KV heads, head dimension, feed-forward size,
rope base and tied embedding, every matmul in the chosen type (Q8_0, Q4_0, Q4_1 or a K-quant, written as GGUF
blocks of random quants with small random scales; q4_k_m (q5_k_m): Q6_K for attn_v, ffn_down and the embedding,
Q4_K (Q5_K) for the rest, as llama.cpp's Q4_K_M (Q5_K_M) mostly does) and the norms in F32. The tokenizer (and so the vocabulary) is the
default model's (SmolLM2, 49,152 tokens), read from its GGUF: the files then run anywhere kvmux does with no
model hub, at the cost of an embedding and lm_head smaller than the real ones (Llama 3.2's 128,256 tokens,
Qwen 2.5's 151,936). All are written as the llama architecture; Qwen 2.5's q/k/v biases are left out (a few
KB, nothing a speed measurement sees). The outputs are noise: these files are for timing, never for quality.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

MODELS_DIR = Path(__file__).resolve().parent / "models"
QTYPES = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K}
# The type of each tensor in a file of a named mix; a plain type is every tensor's.
MIXES = {"q4_k_m": {"token_embd": "q6_k", "attn_v": "q6_k", "ffn_down": "q6_k", "": "q4_k"},
         "q5_k_m": {"token_embd": "q6_k", "attn_v": "q6_k", "ffn_down": "q6_k", "": "q5_k"}}


def tensor_type(qtype: str, tensor: str) -> str:
    mix = MIXES.get(qtype)
    return qtype if mix is None else mix.get(tensor, mix[""])


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_base: float
    context: int


SHAPES = {
    "llama-3.2-1b": Shape(16, 2048, 32, 8, 64, 8192, 500000.0, 8192),
    "llama-3.2-3b": Shape(28, 3072, 24, 8, 128, 8192, 500000.0, 8192),
    "qwen2.5-0.5b": Shape(24, 896, 14, 2, 64, 4864, 1000000.0, 8192),
    "smollm2-135m": Shape(30, 576, 9, 3, 64, 1536, 100000.0, 8192),
}


def random_blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> np.ndarray:
    """GGUF blocks [rows, cols / 32 * block bytes] of uniform random quants; scales so that weights are about
    +-0.02 (as trained matmul weights are), Q4_1 minimums about as large. K-quants: 256 weights a block, every
    sub-block scale (and Q4_K minimum) random too, the super-block's fp16 factors sized to match."""
    if qtype in ("q4_k", "q5_k", "q6_k"):
        blocks = cols // 256
        # Q4_K and Q5_K: weight = d * scale * q - dmin * min, scale and min 6 bits, q 4 or 5 bits; Q6_K:
        # d * scale * (q - 32), scale an int8, q 6 bits.
        d_size = {"q4_k": 0.02 / (63 * 15), "q5_k": 0.02 / (63 * 31), "q6_k": 0.02 / (127 * 32)}[qtype]
        d = (rng.random((rows, blocks, 1 if qtype == "q6_k" else 2), dtype=np.float32) * d_size + 1e-7)
        body = rng.integers(0, 256, (rows, blocks, {"q4_k": 140, "q5_k": 172, "q6_k": 208}[qtype]), dtype=np.uint8)
        head = d.astype(np.float16).view(np.uint8)
        parts = [body, head] if qtype == "q6_k" else [head, body]  # Q6_K keeps its d at the end
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    blocks = cols // 32
    levels = 127 if qtype == "q8_0" else 8
    header = [(rng.random((rows, blocks, 1), dtype=np.float32) * 0.04 / levels + 1e-5).astype(np.float16)]
    if qtype == "q4_1":
        header = [header[0] / 2, (rng.standard_normal((rows, blocks, 1), dtype=np.float32) * 0.005).astype(np.float16)]
    quants = rng.integers(0, 256, (rows, blocks, 32 if qtype == "q8_0" else 16), dtype=np.uint8)
    return np.concatenate([h.view(np.uint8) for h in header] + [quants], axis=-1).reshape(rows, -1)


def write(name: str, shape: Shape, qtype: str, path: Path, tokenizer_gguf: Path, seed: int = 0) -> Path:
    reader = gguf.GGUFReader(str(tokenizer_gguf))

    def field(key: str):
        f = reader.fields[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [int(f.parts[i][0]) for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]][0].item()

    tokens = field("tokenizer.ggml.tokens")
    vocab = len(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"{name} (random weights, {qtype})")
    writer.add_block_count(shape.layers)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model(field("tokenizer.ggml.model"))
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(field("tokenizer.ggml.token_type"))
    writer.add_token_merges(field("tokenizer.ggml.merges"))
    writer.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    writer.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(field("tokenizer.chat_template"))

    rng = np.random.default_rng(seed)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    matmuls = {"attn_q": (q, shape.hidden), "attn_k": (kv, shape.hidden), "attn_v": (kv, shape.hidden),
               "attn_output": (shape.hidden, q), "ffn_gate": (shape.ffn, shape.hidden),
               "ffn_up": (shape.ffn, shape.hidden), "ffn_down": (shape.hidden, shape.ffn)}
    embd = tensor_type(qtype, "token_embd")
    writer.add_tensor("token_embd.weight", random_blocks(rng, embd, vocab, shape.hidden), raw_dtype=QTYPES[embd])
    writer.add_tensor("output_norm.weight", 1 + 0.1 * rng.standard_normal(shape.hidden, dtype=np.float32))
    for layer in range(shape.layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight",
                              1 + 0.1 * rng.standard_normal(shape.hidden, dtype=np.float32))
        for tensor, (rows, cols) in matmuls.items():
            kind = tensor_type(qtype, tensor)
            writer.add_tensor(f"blk.{layer}.{tensor}.weight", random_blocks(rng, kind, rows, cols),
                              raw_dtype=QTYPES[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return path


def main() -> None:
    from kvmux.model.loader import default_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", choices=sorted(SHAPES), help="shapes to write")
    p.add_argument("--qtype", choices=sorted(QTYPES) + sorted(MIXES), default="q4_0",
                   help="matmul weight type, or a mix of them [default: q4_0]")
    p.add_argument("--out", type=Path, default=MODELS_DIR, help="folder [default: bench/models]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in args.models:
        path = write(name, SHAPES[name], args.qtype, args.out / f"{name}.{args.qtype}.gguf", default_model_path(),
                     args.seed)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
