"""Which kernel variant runs each op: what this CPU supports, and KVMUX_KERNELS to force one.

KVMUX_KERNELS is a comma-separated list of op=variant pairs, e.g.
`KVMUX_KERNELS=linear=avx2,attention=avx2`: each named op uses that variant
(tests and debugging pin a path this way); an op not named is chosen as
usual, from the CPU's features and, where shapes decide, by timing the
candidates at load. Naming a variant the CPU cannot run is an error at load
that names the missing instruction set.
"""
from __future__ import annotations

import functools
import os

from kvmux import _native

ENV = "KVMUX_KERNELS"


@functools.cache
def cpu_features() -> dict[str, bool]:
    """Instruction sets this CPU (and, for AMX, the OS) lets the kernels use."""
    return _native.cpu_features()


def forced(op: str) -> str | None:
    """The variant KVMUX_KERNELS names for `op`, or None."""
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        name, sep, variant = item.partition("=")
        if not sep or not name.strip() or not variant.strip():
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: {item!r} is not op=variant (e.g. linear=avx2)")
        if name.strip() == op:
            return variant.strip()
    return None


def check_runnable(op: str, variant: str, needs: tuple[str, ...]) -> None:
    """Raise if this CPU lacks an instruction set `variant` of `op` needs (features as cpu_features names them)."""
    missing = [n for n in needs if not cpu_features().get(n)]
    if missing:
        raise RuntimeError(f"{op} kernel {variant!r} needs {', '.join(missing)}, which this CPU lacks; "
                           f"unset {ENV} or choose another variant")
