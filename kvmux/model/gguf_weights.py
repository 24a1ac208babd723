"""A GGUF file's weights loaded into the model as they are stored: quantized tensors kept in their blocks.

The gguf package's GGUFReader lists the tensors (name, type, shape, where
the bytes are), once per file: parsing a file's metadata (its vocabulary is
some 100,000 small fields) takes seconds and a few hundred MB, so the list is
cached as JSON beside the config and tokenizer (`tensor_table`). The bytes
are read with plain file reads, one tensor at a time, so the file is never
mapped and its pages never count towards the process's memory. llama.cpp names tensors its own way
(`blk.3.attn_q.weight`); the gguf package's TensorNameMap gives the name for
each of the model's Hugging Face names. llama.cpp's converter permutes the
rows of q and k for the `llama` architecture (its rotary embedding pairs
neighbouring dimensions, Hugging Face's pairs the two halves of a head);
transformers undoes that when it dequantizes, and so does this module, on the
quantized rows (a row permutation leaves every block intact). llama.cpp's
converter stores Gemma's norm weights with Gemma's 1 added (its RMSNorm scales
by 1 + weight); transformers takes it back out, and so does this module.

What each matmul becomes (`Storage`): the kernel form of its types
(kvmux/ops/gguf_blocks.py: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) when
every part of it (q, k and v for the merged qkv) reads into one form exactly (a
Q5_0 q and k beside a Q8_0 v all become Q8_0), and where they share none, one
matmul per run of parts that do (a Q4_K q and k beside a Q6_K v: two, in their
own forms, rather than a float copy); Q8_0 when `requantize_q8_0` is
asked for (a Q8_0 tensor is kept as it is, any other is dequantized and
quantized again); otherwise float weights, dequantized by the gguf package, and
packed like a safetensors model's (so an F16 or IQ4 tensor costs its float32
size, and the log says which tensors did so). Norms and biases are float
weights either way.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from kvmux.model.llama import Linear, LlamaForCausalLM, MergedLinear
from kvmux.ops.gguf_blocks import fits, form_runs
from kvmux.ops.quant import pack_parts, quantize_q8_0

log = logging.getLogger(__name__)

PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp permutes q/k rows for these (transformers' LlamaTensorProcessor)
NORMS_PLUS_ONE = ("gemma3",)  # llama.cpp stores these norms' weights + 1 (transformers' Gemma2TensorProcessor)
IGNORED = ("rope_freqs.weight",)  # derived from the config here, as transformers does


@dataclass
class Storage:
    """How the loaded model holds its matmul weights, for logs and `Engine.describe()` (which kernel multiplies
    each shape is in its `kernels`, timed at load)."""

    matmuls: Counter = field(default_factory=Counter)           # storage ("q4_1", "float32", ...) -> matmuls
    dense_from: dict[str, str] = field(default_factory=dict)    # GGUF tensor -> its type, for those made float
    weight_bytes: int = 0                                        # the matmul weights as held

    def as_dict(self) -> dict:
        return {"matmuls": dict(self.matmuls), "dequantized": dict(self.dense_from),
                "weight_mib": round(self.weight_bytes / 2**20, 1)}


TABLE = "gguf_tensors.json"


@dataclass
class TensorInfo:
    name: str
    type: gguf.GGMLQuantizationType
    shape: list[int]  # Hugging Face's order: outermost first (GGUF lists dimensions innermost first)
    offset: int       # of its bytes in the file
    nbytes: int


def write_tensor_table(path: Path, dst: Path) -> None:
    """dst/TABLE: `path`'s architecture and every tensor's TensorInfo, from the gguf package's reader."""
    reader = gguf.GGUFReader(path)
    table = {"architecture": reader.fields["general.architecture"].contents(),
             "tensors": [{"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in reversed(t.shape)],
                          "offset": int(t.data_offset), "nbytes": int(t.n_bytes)} for t in reader.tensors]}
    (dst / TABLE).write_text(json.dumps(table))


class GGUFTensors:
    """The tensors of one GGUF file under their Hugging Face names."""

    def __init__(self, path: Path, metadata: Path, config) -> None:
        self.path = path
        table = json.loads((metadata / TABLE).read_text())
        self.architecture = table["architecture"]
        arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(self.architecture)
        if arch is None:
            raise ValueError(f"{path}: GGUF architecture {self.architecture!r} is unknown to the gguf package")
        self.names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        self.tensors = {t["name"]: TensorInfo(t["name"], gguf.GGMLQuantizationType(t["type"]), t["shape"],
                                              t["offset"], t["nbytes"]) for t in table["tensors"]}
        self.config = config
        self.used: set[str] = set()

    def gguf_name(self, hf_name: str) -> str:
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor for the model's {hf_name!r} (looked for {name!r})")
        return name

    def qtype(self, hf_name: str) -> gguf.GGMLQuantizationType:
        return self.tensors[self.gguf_name(hf_name)].type

    def _read(self, name: str, start: int = 0, nbytes: int | None = None) -> np.ndarray:
        """`nbytes` of tensor `name`'s bytes from `start` on (all of them by default)."""
        t = self.tensors[name]
        nbytes = t.nbytes - start if nbytes is None else nbytes
        buf = np.empty(nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset + start)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{self.path} is truncated: tensor {name} needs {t.nbytes} bytes")
        self.used.add(name)
        return buf

    def _row_order(self, hf_name: str, rows: int) -> torch.Tensor | None:
        """The GGUF row each Hugging Face row of q/k comes from, where llama.cpp permuted them."""
        if self.architecture not in PERMUTED_ARCHITECTURES or not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        heads = self.config.num_attention_heads if "q_proj" in hf_name else self.config.num_key_value_heads
        return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)

    def blocks(self, hf_name: str) -> torch.Tensor | FileRows:
        """A quantized tensor's blocks, uint8 [rows, bytes per row], rows in Hugging Face's order: read from the
        file as they are sliced where the order is the file's (a 170 MB embedding is never held twice)."""
        name = self.gguf_name(hf_name)
        rows = self.tensors[name].shape[0]
        order = self._row_order(hf_name, rows)
        if order is None:
            return FileRows(self, name, rows, self.tensors[name].nbytes // rows)
        return torch.from_numpy(self._read(name)).reshape(rows, -1)[order]

    def dense(self, hf_name: str) -> torch.Tensor:
        """Any tensor as float32 in Hugging Face's shape, dequantized by the gguf package where it is quantized."""
        name = self.gguf_name(hf_name)
        t = self.tensors[name]
        shape, raw = t.shape, self._read(name)
        if t.type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            values = raw.view(np.float32 if t.type == gguf.GGMLQuantizationType.F32 else np.float16)
        else:
            values = gguf.quants.dequantize(raw.reshape(shape[0] if len(shape) > 1 else 1, -1), t.type)
        w = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        if self.architecture in NORMS_PLUS_ONE and hf_name.endswith("norm.weight"):
            w = w - 1
        order = self._row_order(hf_name, shape[0])
        return w if order is None else w[order]

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used - set(IGNORED))


@dataclass
class FileRows:
    """Rows of a quantized tensor, read from the file when sliced (what kvmux.ops.quant.pack_parts reads)."""

    tensors: GGUFTensors
    name: str
    rows: int
    row_bytes: int
    dtype = torch.uint8

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.row_bytes

    def dim(self) -> int:
        return 2

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.rows)
        raw = self.tensors._read(self.name, start * self.row_bytes, (stop - start) * self.row_bytes)
        return torch.from_numpy(raw).reshape(stop - start, self.row_bytes)


def weight_parts(prefix: str, module: Linear) -> list[str]:
    """The Hugging Face weight names a Linear holds, in its storage order."""
    if isinstance(module, MergedLinear):
        parent = prefix.rpartition(".")[0]
        return [f"{parent}.{name}.weight" for name in module.parts]
    return [f"{prefix}.weight"]


def load_gguf(net: LlamaForCausalLM, path: Path, metadata: Path, requantize_q8_0: bool = False) -> Storage:
    """Fill `net` (CPU, not yet packed) from the GGUF at `path`, whose tensor table is in the folder `metadata`:
    see the module docstring for what each matmul becomes. Every parameter must be found and every tensor of
    the file used."""
    tensors = GGUFTensors(path, metadata, net.config)
    storage = Storage()
    params = net.hf_parameters()  # before any module is quantized: merged parts are views of their storage
    quantized: list[tuple[Linear, list[str], list[tuple[int, int, str]]]] = []
    dense_names = set(params)
    for prefix, module in net.named_modules():
        if not isinstance(module, Linear):
            continue
        parts = weight_parts(prefix, module)
        dense_names -= set(parts)
        runs = form_runs([tensors.qtype(p).name for p in parts])
        if requantize_q8_0 and module.in_features % 32 == 0:
            quantized.append((module, parts, [(0, len(parts), "q8_0")]))
        elif runs is not None and not requantize_q8_0:
            quantized.append((module, parts, runs))
        else:
            for p in parts:
                storage.dense_from[tensors.gguf_name(p)] = tensors.qtype(p).name
                params[p].copy_(tensors.dense(p))
            storage.matmuls[str(net.dtype).removeprefix("torch.")] += 1
    for name in dense_names:  # norms and biases
        params[name].copy_(tensors.dense(name))
    for module, parts, runs in quantized:
        weights = []
        for start, end, qtype in runs:
            run = parts[start:end]
            types = [tensors.qtype(p).name for p in run]
            if fits(types, qtype):  # Q4_0 and Q5_0 read into Q8_0 exactly, so they are not requantized either
                weights.append(pack_parts([(t, tensors.blocks(p)) for t, p in zip(types, run)], qtype))
            else:  # requantizing to Q8_0
                weights.append(quantize_q8_0(torch.cat([tensors.dense(p) for p in run])))
            storage.matmuls[qtype] += 1
        # Parts that share no form (a Q6_K v beside Q4_K q and k) run as one matmul per run of a form.
        if len(weights) == 1:
            module.set_quantized(weights[0])
        else:
            module.set_pieces(weights)
    if unused := tensors.unused():
        raise ValueError(f"{path}: tensors {unused[:5]} ({len(unused)} in all) match no parameter of the model")
    for module in net.modules():
        if isinstance(module, Linear):
            storage.weight_bytes += module.weight_bytes()
    if storage.dense_from:
        log.warning("%s: %d tensors are of types kvmux does not multiply quantized (%s); they are dequantized to "
                    "%s", path.name, len(storage.dense_from), ", ".join(sorted(set(storage.dense_from.values()))),
                    net.dtype)
    log.info("%s: matmuls %s, %.1f MiB", path.name, dict(storage.matmuls), storage.weight_bytes / 2**20)
    return storage
