"""The kernels' thread count: the one number every native kernel reads, by default as many CPUs as this
process may really use.

The kernels run on kvmux's own pool (native/cpu/thread_pool.h), which a busy neighbour process cannot stall:
tasks are taken dynamically and the caller stops sharing work with a helper the OS keeps descheduling. How
many threads it uses is decided here. A process may use fewer CPUs than the machine has: its affinity mask
(taskset, a container's cpuset) and its cgroup's CPU quota (`cpu.max` of `150000 100000` is 1.5 CPUs on a host
of any size). Threads beyond that only wait for each other, so the default is the smaller of the two, a
fractional quota rounded down (1.5 CPUs: one thread that runs, rather than two that the quota throttles in
turn). `threads=` (`--threads`) overrides it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from kvmux import _native

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """What this process may use: CPUs in its affinity mask, and its cgroup's CPU quota in CPUs (None: none)."""

    affinity: int
    quota: float | None

    @property
    def threads(self) -> int:
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.floor(self.quota)))

    def reason(self) -> str:
        if self.quota is not None and math.floor(self.quota) < self.affinity:
            return f"cgroup CPU quota of {self.quota:g} CPUs"
        return f"{self.affinity} CPUs in this process's affinity mask"


def cgroup_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors, in CPUs (cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None where there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            folder, files = root / path.lstrip("/"), ("cpu.max",)
        elif "cpu" in controllers.split(","):
            folder, files = root / controllers / path.lstrip("/"), ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if not folder.exists():
                folder = root / "cpu" / path.lstrip("/")
        else:
            continue
        while True:
            quotas.append(_read_quota(folder, files))
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _read_quota(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if files == ("cpu.max",):
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota, period = ((folder / f).read_text().strip() for f in files)
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)


def cpu_budget() -> CpuBudget:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuBudget(affinity, cgroup_quota())


_threads: int | None = None


def threads() -> int:
    """How many threads the kernels run on: set_threads' count, else this process's CPU budget."""
    global _threads
    if _threads is None:
        _threads = cpu_budget().threads
    return _threads


def set_threads(n: int) -> None:
    global _threads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _threads = n


def pool_stats() -> dict[str, int]:
    """The kernels' pool since the process started, as engine stats (`pool_` names)."""
    return {f"pool_{k}": v for k, v in _native.pool_stats().items()}
