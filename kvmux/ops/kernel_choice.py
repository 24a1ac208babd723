"""Which kernel variant runs each op: what this CPU supports, timing at load, and KVMUX_KERNELS to force one.

Every CPU kernel variant is one `Variant` in `VARIANTS`: the op it implements
(as KVMUX_KERNELS names it), its name, the instruction sets it needs (as
`cpu_features()` names them) and the formats it takes (weight formats for
`linear`, KV dtypes for `attention`). One name may have several entries for
different formats (an AVX2 kernel per weight format, say): KVMUX_KERNELS then
pins each format to its own. The extension is built for the AVX2/FMA
baseline and carries the faster variants compiled for their own instruction
sets, so which ones may run is a run-time question; among those, an op whose
speed depends on shapes times them at load (`fastest`).

KVMUX_KERNELS is a comma-separated list of op=variant pairs, e.g.
`KVMUX_KERNELS=linear=avx2,attention=avx2`: each named op uses that variant
wherever the variant takes the format (tests and debugging pin a path this
way; `linear=avx2,attention=avx2` is what an AVX2-only host runs); an op not
named is chosen as usual. Naming a variant the CPU cannot run is an error at
load that names the missing instruction set.
"""
from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmux import _native

ENV = "KVMUX_KERNELS"
AVX2 = ("avx2", "fma")
AVX512 = ("avx512f", "avx512bw", "avx512vl")
QUANT_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q6_k")  # the forms GGUF blocks are kept in (ops/quant.py)
AMX_BF16 = AVX512 + ("f16c", "avx512bf16", "amx_tile", "amx_bf16")
DEQUANTIZED_AMX = "x rounded to bf16, the weight dequantized to bf16 an L2-sized chunk at a time, AMX tiles over it"


@dataclass(frozen=True)
class Variant:
    op: str                    # what KVMUX_KERNELS calls the op: linear, attention
    name: str                  # what KVMUX_KERNELS calls the variant
    needs: tuple[str, ...]     # instruction sets, as cpu_features() names them
    formats: tuple[str, ...]   # weight formats (linear: a dtype as torch names it, or a GGUF block type) or KV
                               # dtypes (attention) it takes
    summary: str
    automatic: bool = True     # a candidate when nothing is forced (else only when KVMUX_KERNELS names it)
    # None: timed against the others at every row range. n: computes other numbers than the others (bf16 where
    # they quantize), so timing must not pick it in one run and not in the next: the only candidate for row
    # ranges timed at n rows or more, and none below.
    from_rows: int | None = None

    def missing(self) -> list[str]:
        """The instruction sets this CPU lacks for it (empty: it runs here)."""
        return [n for n in self.needs if not cpu_features().get(n)]


VARIANTS: tuple[Variant, ...] = (
    Variant("linear", "avx2", AVX2, ("float32", "bfloat16"),
            "float32 FMA over packed panels (bf16 panels widened as read)"),
    Variant("linear", "avx512bf16", AVX512 + ("avx512bf16",), ("bfloat16",),
            "x rounded to bf16, vdpbf16ps over the panels, float32 sums"),
    Variant("linear", "amx", AVX512 + ("avx512bf16", "amx_tile", "amx_bf16"), ("bfloat16",),
            "x rounded to bf16, AMX tiles over the panels, float32 sums"),
    # Its results are rounded to bf16 (torch's CPU F.linear has no float32 output for bf16 inputs), which cost
    # 1.4 points of argmax agreement with float32 (97.8% vs 99.2%, python -m bench.efficiency): measured, not chosen.
    Variant("linear", "onednn", (), ("bfloat16",),
            "torch's F.linear in bf16 (oneDNN) over an [N, K] copy of the weight; bf16 results", automatic=False),
    # Quantized weights (kvmux/ops/quant.py): activations quantized per block, integer dot products.
    Variant("linear", "avx2", AVX2 + ("f16c",), QUANT_FORMATS,
            "int8 (int16 for Q8_0) activations, vpmaddubsw / vpmaddwd over quantized blocks"),
    Variant("linear", "avxvnni", AVX2 + ("f16c", "avxvnni"), QUANT_FORMATS,
            "int8 (int16 for Q8_0) activations, 256-bit vpdpbusd / vpdpwssd over quantized blocks"),
    Variant("linear", "amx", AVX512 + ("f16c", "amx_tile", "amx_int8"), QUANT_FORMATS,
            "one tile dot product per block: 16 rows x 16 outputs x 32 k (bytes; Q8_0's int16 activations as two)"),
    # At 64 and 256 rows it ran 1.2-4x the int8 variants on every shape measured (SmolLM2, Gemma 3, Llama 3.2
    # 1B; docs/benchmarks.md), at 16 it lost on the byte forms; ranges timed at 64 rows and up take it untimed.
    # Q8_0's int8 tiles multiply int16 activations, half as many a dot product: there it won from 16 rows
    # (Gemma 3's 1536 x 640 and LM head 1.3x at 16, 1.8-2.1x at 32; even at 9).
    Variant("linear", "amx_bf16", AMX_BF16, QUANT_FORMATS[1:], DEQUANTIZED_AMX, from_rows=64),
    Variant("linear", "amx_bf16", AMX_BF16, ("q8_0",), DEQUANTIZED_AMX, from_rows=16),
    Variant("linear", "avx512vnni", AVX512 + ("f16c", "avx512vnni"), QUANT_FORMATS,
            "int8 (int16 for Q8_0) activations, 512-bit vpdpbusd / vpdpwssd over quantized blocks"),
    Variant("attention", "avx2", AVX2, ("float32", "bfloat16", "int8"),
            "float32 FMA; bf16 or int8 K/V widened (int8 times its row's scale) once per chunk of keys"),
    Variant("attention", "avx512bf16", AVX512 + ("avx512bf16",), ("bfloat16",),
            "q.K and the softmax weights.V as bf16 pairs through vdpbf16ps; float32 sums and softmax"),
    Variant("attention", "avx512vnni", AVX512 + ("f16c", "avx512vnni"), ("int8",),
            "q (16 bits per row, as two bytes) . K and the softmax weights (8 bits per chunk) . V through vpdpbusd from "
            "the int8 slabs; float32 softmax"),
)


@functools.cache
def cpu_features() -> dict[str, bool]:
    """Instruction sets this CPU (and, for AMX, the OS) lets the kernels use."""
    return _native.cpu_features()


def variant(op: str, name: str, fmt: str | None = None) -> Variant:
    """The entry for `op`'s variant `name` (for `fmt`, where one name has entries for several formats)."""
    named = [v for v in VARIANTS if v.op == op and v.name == name]
    if not named:
        known = ", ".join(dict.fromkeys(v.name for v in VARIANTS if v.op == op))
        raise ValueError(f"{ENV}: {op} has no variant {name!r}; its variants: {known}")
    if fmt is None:
        return named[0]
    for v in named:
        if fmt in v.formats:
            return v
    takes = ", ".join(f for v in named for f in v.formats)
    raise ValueError(f"{ENV}: {op} kernel {name!r} takes {takes}, not {fmt}")


def forced(op: str) -> str | None:
    """The variant KVMUX_KERNELS names for `op`, or None."""
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        name, sep, chosen = item.partition("=")
        if not sep or not name.strip() or not chosen.strip():
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: {item!r} is not op=variant (e.g. linear=avx2)")
        if name.strip() == op:
            return chosen.strip()
    return None


def check_runnable(v: Variant) -> None:
    """Raise if this CPU lacks an instruction set `v` needs."""
    missing = v.missing()
    if missing:
        raise RuntimeError(f"{v.op} kernel {v.name!r} needs {', '.join(missing)}, which this CPU lacks; "
                           f"unset {ENV} or choose another variant")


def runnable(op: str, fmt: str) -> list[Variant]:
    """Every variant of `op` for `fmt` this CPU runs (benchmarks and checks list these)."""
    return [v for v in VARIANTS if v.op == op and fmt in v.formats and not v.missing()]


def candidates(op: str, fmt: str) -> list[Variant]:
    """The variants that may run `op` on `fmt` here: the one KVMUX_KERNELS forces, else every automatic one
    this CPU runs."""
    name = forced(op)
    if name is not None:
        v = variant(op, name, fmt)
        check_runnable(v)
        return [v]
    found = [v for v in runnable(op, fmt) if v.automatic]
    if not found:
        raise RuntimeError(f"no {op} kernel for {fmt} runs on this CPU (needs at least {', '.join(AVX2)})")
    return found


def at_rows(found: list[Variant], rows: int) -> list[Variant]:
    """The candidates among `found` for a row range timed at `rows` (Variant.from_rows): one that takes such
    ranges alone, else those timed at every range (else, when KVMUX_KERNELS forced one, that one)."""
    taking = [v for v in found if v.from_rows is not None and rows >= v.from_rows]
    return taking[:1] or [v for v in found if v.from_rows is None] or found


def fastest(runs: dict[str, Sequence[Callable[[], object]]], budget_s: float = 0.001,
            rounds: int = 4) -> dict[str, float]:
    """The fastest single call of each candidate, in seconds of the calling thread's CPU time, best first.

    Each candidate is a sequence of calls (one per layer of a shape, say) taken in turn, so that successive
    calls read different weights as a forward does. Candidates are timed in interleaved rounds of about
    `budget_s` each, and each call on its own, in CPU time: on a shared machine wall time mostly measures the
    other processes (a call waits whenever they hold a core), CPU time only the kernel. The caller runs them
    on one thread (the kernels split their work evenly across threads, so one thread's time ranks them as
    several threads' would). After a warm-up call each and two rounds, a candidate over 3x slower than the
    fastest is not timed again."""
    best, calls, turn = {}, {}, {name: 0 for name in runs}
    for name, fns in runs.items():
        start = time.thread_time()
        fns[0]()  # also the warm-up: first-touch page faults, AMX's first tile configuration
        calls[name] = max(1, min(16, int(budget_s / max(time.thread_time() - start, 1e-6))))
        best[name] = math.inf
    keep = dict(runs)
    for i in range(rounds):
        for name, fns in keep.items():
            for _ in range(calls[name]):
                fn = fns[turn[name] % len(fns)]
                turn[name] += 1
                start = time.thread_time()
                fn()
                best[name] = min(best[name], time.thread_time() - start)
        if i == 1:
            fastest_s = min(best.values())
            keep = {name: fns for name, fns in keep.items() if best[name] <= 3 * fastest_s}
    return dict(sorted(best.items(), key=lambda item: item[1]))
