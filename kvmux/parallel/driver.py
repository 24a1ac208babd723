"""The engine process's side of tensor parallelism: it starts (or is joined by) the model ranks, sends each
step once, and reads back only the sampled tokens.

The driver is global rank 0 of a gloo group of N + 1 processes and holds no
weights; the scheduler, the allocator and the actors stay single, here.
`ParallelRunner.execute` has the Runner's contract, so decode cannot tell
the two apart. Per step the driver broadcasts the StepWork (token ids,
positions, block tables, draws, block copies: a few kB) and model rank 0
sends back 8 bytes per sampled token; the activations never leave the
model ranks, which all-reduce among themselves.

A rank that dies breaks the next collective at once (its sockets close); one
that hangs breaks it within the group's timeout. Either way the runner fails
the step, reports the failure (the engine then fails every request and
stops), and takes the other ranks down with it. An idle driver pings the
ranks so that their waits for the next step stay inside the timeout.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from kvmux.cache.disk_store import Opened
from kvmux.ops.threads import cpu_budget
from kvmux.parallel.worker import Spec, fingerprint, model_group, reply_size, timeout, unpack_samples
from kvmux.step.work import Sampled, StepWork


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, hung, or disagrees with the others."""


@dataclass
class Launch:
    size: int  # model ranks
    init_method: str | None  # tcp://host:port; None: a free port on this machine, every rank local
    nnodes: int = 1  # machines; this one (node 0) runs the driver and its share of the ranks

    @property
    def local_ranks(self) -> int:
        return self.size // self.nnodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(launch: Launch, init_method: str, node_rank: int, model: str | None = None) -> list[subprocess.Popen]:
    """This machine's model ranks as child processes, their threads sharing its cores."""
    threads = max(1, cpu_budget().threads // launch.local_ranks)
    first = 1 + node_rank * launch.local_ranks
    return [subprocess.Popen([sys.executable, "-m", "kvmux.parallel.worker", "--rank", str(rank),
                              "--world-size", str(launch.size + 1), "--init-method", init_method,
                              "--threads", str(threads), *(["--model", model] if model else [])])
            for rank in range(first, first + launch.local_ranks)]


class ParallelRunner:
    PING_S = 5.0

    def __init__(self, launch: Launch, spec: Spec, config, on_failure: Callable[[str], None]) -> None:
        if launch.size % launch.nnodes:
            raise ValueError(f"tensor_parallel_size {launch.size} is not a multiple of nnodes {launch.nnodes}")
        init_method = launch.init_method or f"tcp://127.0.0.1:{free_port()}"
        self.on_failure = on_failure
        self.failed: str | None = None
        self.lock = threading.Lock()  # one collective at a time: the forward thread's, or the pinger's
        # Set by close: torch.distributed's group is one per process, so a pinger that outlived its engine
        # would ping the next engine's group.
        self.closing = threading.Event()
        self.pinger: threading.Thread | None = None
        self.last_op = time.monotonic()
        self.broadcast_seconds = 0.0
        self.steps = 0
        self.size = launch.size
        self.counters = dict.fromkeys(self.RANK0_COUNTERS, 0.0)
        # Disk blocks hit since the last step, per disk tier, for the ranks' journals.
        self.touched: dict[int, list[tuple[int, int]]] = {}
        self.touched_lock = threading.Lock()  # the engine's loop adds to it, the forward thread takes it
        self.ranks = start_ranks(launch, init_method, node_rank=0)
        try:
            dist.init_process_group("gloo", init_method=init_method, world_size=launch.size + 1, rank=0,
                                    timeout=timeout())
            dist.broadcast_object_list([spec], src=0)
            model_group(launch.size)  # every process takes part in creating it
            prints = [None] * (launch.size + 1)
            dist.gather_object(None, prints, dst=0)
        except Exception as exc:
            self.close()
            raise RankFailure(f"the tensor-parallel ranks did not start: {exc}") from exc
        want = fingerprint(config, spec)
        wrong = [rank for rank, (p, _) in enumerate(prints[1:], start=1) if p != want]
        if wrong:
            reason = (f"ranks {wrong} loaded another model or other settings than the engine; start every rank "
                      f"with the same --model and engine options")
            self.close(refused=reason)
            raise RankFailure(reason)
        # What each disk tier holds from earlier runs: the blocks every rank has whole.
        self.disk_opened = {tier: Opened.common([opened[tier] for _, opened in prints[1:]]) for tier in prints[1][1]}
        self.pinger = threading.Thread(target=self._ping, name="kvmux-tp-ping", daemon=True)
        self.pinger.start()

    def _broadcast(self, message) -> None:
        started = time.perf_counter()
        dist.broadcast_object_list([message], src=0)
        self.broadcast_seconds += time.perf_counter() - started

    def _collective(self, fn):
        if self.failed:
            raise RankFailure(self.failed)
        with self.lock:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - any collective failure means a rank is gone
                self.failed = f"a tensor-parallel rank failed: {exc}"
                self.on_failure(self.failed)
                raise RankFailure(self.failed) from exc
            finally:
                self.last_op = time.monotonic()

    def execute(self, work: StepWork) -> list[list[Sampled]]:
        if work.steps > 1:  # ranks other than 0 never see the sampled tokens the later forwards take
            raise ValueError(f"tensor parallelism runs one forward per step, not {work.steps}")
        if isinstance(work.masks, Future):  # the ranks need the masks themselves: they cannot wait on a future here
            work = replace(work, masks=work.masks.result())

        def step() -> list[list[Sampled]]:
            with self.touched_lock:
                touched, self.touched = self.touched, {}
            self._broadcast(("step", (work, touched)))
            self.steps += 1
            reply = torch.empty(len(self.RANK0_COUNTERS) + reply_size(work), dtype=torch.float64)
            dist.recv(reply, src=1)
            self.counters = dict(zip(self.RANK0_COUNTERS, reply[:len(self.RANK0_COUNTERS)].tolist()))
            return unpack_samples(reply[len(self.RANK0_COUNTERS):].tolist(), work)
        return self._collective(step)

    # What model rank 0 reports after each step, before the sampled tokens.
    RANK0_COUNTERS = ("tp_compute_seconds", "tp_collective_seconds", "tp_collective_bytes", "block_copy_bytes",
                      "block_copy_seconds", "block_copy_wait_seconds")

    def copy_bytes_per_s(self) -> float:
        from kvmux.cache.transfer import BlockCopier

        return BlockCopier.PRIOR_BYTES_PER_S  # the ranks copy; the driver only decides what

    def stats(self) -> dict:
        """Step time split: model rank 0's compute and collectives, the driver's step broadcasts (its block
        copies are one rank's; every rank copies as much)."""
        return {"tp_size": self.size, "tp_steps": self.steps, "tp_broadcast_seconds": self.broadcast_seconds,
                **self.counters}

    def disk_touched(self, tier: int, blocks: list[tuple[int, int]]) -> None:
        """Blocks (slot, hash) of disk tier `tier` hit: each rank journals them with the next step, keeping the LRU
        order."""
        with self.touched_lock:
            self.touched.setdefault(tier, []).extend(blocks)

    def _ping(self) -> None:
        while not self.failed and not self.closing.wait(self.PING_S / 2):
            if time.monotonic() - self.last_op >= self.PING_S and self.lock.acquire(blocking=False):
                try:
                    if dist.is_initialized() and not self.failed and not self.closing.is_set():
                        try:
                            self._broadcast(("ping", None))
                        except Exception as exc:  # noqa: BLE001
                            self.failed = f"a tensor-parallel rank failed: {exc}"
                            self.on_failure(self.failed)
                finally:
                    self.last_op = time.monotonic()
                    self.lock.release()

    def close(self, refused: str | None = None) -> None:
        """Stop the ranks (asking first, then killing whoever is left) and leave the group; `refused` tells
        them the engine would not run with them, and why (they exit with an error saying so)."""
        self.closing.set()
        if self.pinger is not None and self.pinger is not threading.current_thread():
            self.pinger.join(timeout=2 * self.PING_S)
        with self.lock:
            if dist.is_initialized():
                if not self.failed:
                    try:
                        self._broadcast(("refused", refused) if refused else ("stop", None))
                    except Exception:  # noqa: BLE001 - the ranks are going anyway
                        pass
                dist.destroy_process_group()
        deadline = time.monotonic() + 10
        for proc in self.ranks:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
