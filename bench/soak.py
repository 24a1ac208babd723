"""Soak test: drive a `kvmux serve` process with a bounded mix of clients, then check nothing leaked.

    python -m bench.soak                          # the default model, 3 minutes
    python -m bench.soak --duration 600 --out bench/results/soak_long.json
    python -m bench.soak --model path/to/tiny --duration 15 --warmup 5 --max-model-len 256

Clients stream, complete, abort, vanish mid-request, share prefixes, send
oversize prompts, bad parameters, garbage frames, bursts past the
per-connection limit, and try to pin memory (requests with every list at its
limit, and frames near the frame limit whose lists are past theirs). At the
end every request must have ended with its complete output, an abort it asked
for, or an error with an expected code; the server must still answer; every
block tier must be whole again (device `blocks_free == blocks_total`, no host
block held, nothing left swapped out; cached blocks count as free); the
server's resident memory must not have grown by more than the stated bound
(plus the host pool, whose pages become resident as it fills) after warm-up;
and SIGTERM, sent while a client floods the server and reads nothing, must
end the server within grace period + drain timeout (+ slack). Exit status 0
when all of that holds.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmux.sampling import MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS
from kvmux.serve import protocol
from kvmux.serve.client import AsyncClient, ConnectionLost, ServerError

WORDS = ("the page table maps each block of keys and values to a slot in the pool so that many requests "
         "share one cache while the scheduler decides who runs next and who waits for memory").split()
SYSTEM = "You are a careful assistant inside a soak test. Answer briefly and stay on topic. " * 20
# Characters of a text prompt left for the chat template's own tokens (SmolLM2's adds a default system prompt).
TEMPLATE_ROOM = 64
# A request's lists at their limits (4-byte characters: the largest strings), and issue 13's frame: 330,000 stop
# token ids in 0.94 MiB, within the default frame limit, which used to pin 25 MiB for the request's life.
LIST_LIMITS = {"stop": [chr(0x10000 + i) * MAX_STOP_CHARS for i in range(MAX_STOP)],
               "stop_token_ids": list(range(1000, 1000 + MAX_STOP_TOKEN_IDS))}
PAST_LIMITS = {"stop_token_ids": [40000] * 330_000}
# Seconds beyond grace period + drain timeout that stopping the engine (the step under way) and the process may
# take: the interpreter's teardown of torch alone took 2-10 s on the shared 2-core machine under load.
SHUTDOWN_SLACK = 30.0

# Each kind of client action, its weight in the mix, and the error codes that count as a correct answer for it.
# overloaded is always acceptable: under load the engine may hold its maximum of pending requests.
KINDS = {
    "stream": (30, set()),
    "complete": (15, set()),
    "shared_prefix": (15, set()),
    "parallel": (5, set()),
    "abort": (10, set()),
    "disconnect": (10, set()),
    "oversize": (4, {"prompt_too_long"}),
    "invalid": (4, {"invalid_params", "invalid_field", "invalid_prompt"}),
    "garbage": (3, {"malformed_frame", "frame_too_large"}),
    "burst": (4, {"too_many_requests"}),
    "pin": (2, {"invalid_params"}),
}
ALWAYS_OK = {"overloaded"}


@dataclass
class SoakConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    duration: float = 180.0  # seconds of load
    warmup: float = 20.0  # seconds of load before the first memory reading
    clients: int = 12  # concurrent client workers, each with its own connection
    max_tokens: int = 24  # upper bound of a request's max_tokens
    num_blocks: int = 96  # a small pool, so the load causes preemptions
    num_host_blocks: int = 96  # the host tier (swapped-out sequences, demoted prefixes); its pages count in RSS
    block_size: int = 16
    max_model_len: int = 1024
    max_prompt_tokens: int = 384
    max_pending: int = 48
    max_num_batched_tokens: int = 128  # small prompt chunks, so decodes keep moving while prompts are computed
    max_inflight_per_connection: int = 8
    threads: int = 1  # torch threads of the server
    grace_period: float = 5.0  # the server's, on SIGTERM
    drain_timeout: float = 5.0  # the server's: after the grace period, for the last answers to reach clients
    request_timeout: float = 180.0  # a request without its last frame by then counts as a hang
    # Allowed growth of the server's resident memory after warm-up, beyond the host pool: that pool is
    # allocated untouched and its pages become resident as blocks are first swapped or demoted to it.
    rss_bound_mib: float = 100.0
    seed: int = 0
    out: str | None = "bench/results/soak.json"


@dataclass
class Tally:
    requests: int = 0
    completed: int = 0  # ended with their whole output (stop / length)
    aborted: int = 0  # aborted or disconnected on purpose
    output_tokens: int = 0
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    errors_by_code: collections.Counter = field(default_factory=collections.Counter)  # expected error answers
    problems: list[str] = field(default_factory=list)  # anything that is not a correct answer
    hangs: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, completed requests
    first_token: list[float] = field(default_factory=list)

    def problem(self, what: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(what)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, cfg: SoakConfig, socket_path: str, vocab: int, rng: random.Random) -> None:
        self.cfg = cfg
        self.path = socket_path
        self.vocab = vocab
        self.rng = rng
        self.tally = Tally()
        self.stop_at = 0.0
        self.ids = 0

    # -- building requests -------------------------------------------------------

    def params(self, **over) -> dict:
        r = self.rng
        p = {"max_tokens": r.randint(1, self.cfg.max_tokens), "temperature": r.choice([0, 0, 0.8]),
             "seed": r.randrange(1 << 31), "ignore_eos": r.random() < 0.5}
        return {**p, **over}

    def text(self, max_chars: int) -> str:
        """Words up to max_chars characters. A byte-level tokenizer never makes more tokens than bytes, so a
        text this long always fits in max_prompt_tokens with the template's room to spare."""
        words, length = [], 0
        while True:
            word = self.rng.choice(WORDS)
            if words and length + len(word) + 1 > max_chars:
                return " ".join(words)
            words.append(word)
            length += len(word) + 1

    def prompt(self):
        r = self.rng
        room = self.cfg.max_prompt_tokens - TEMPLATE_ROOM
        if r.random() < 0.4:
            return [r.randrange(3, self.vocab) for _ in range(r.randint(1, min(120, self.cfg.max_prompt_tokens)))]
        text = self.text(r.randint(1, room))
        return text if r.random() < 0.5 else [{"role": "user", "content": text}]

    def shared_prefix_prompt(self) -> list[dict]:
        # Two thirds of the room is a system prompt every such request shares; the rest varies.
        room = self.cfg.max_prompt_tokens - TEMPLATE_ROOM
        system = SYSTEM[:room * 2 // 3]
        return [{"role": "system", "content": system},
                {"role": "user", "content": self.text(self.rng.randint(1, room - len(system)))}]

    # -- checking answers ----------------------------------------------------------

    def check_complete(self, kind: str, frames: list, params: dict, started: float, first: float | None) -> None:
        n = params.get("n", 1)
        finals = {f.index: f for f in frames if f.finished}
        tokens = collections.Counter()
        for f in frames:
            tokens[f.index] += len(f.token_ids)
        if sorted(finals) != list(range(n)):
            return self.tally.problem(f"{kind}: samples finished {sorted(finals)}, expected {n}")
        for i, f in finals.items():
            if f.finish_reason not in ("stop", "length"):
                return self.tally.problem(f"{kind}: finish_reason {f.finish_reason!r} ({f.error})")
            if tokens[i] != f.num_output_tokens or f.num_output_tokens > params["max_tokens"]:
                return self.tally.problem(f"{kind}: {tokens[i]} tokens streamed, {f.num_output_tokens} counted")
            if f.finish_reason == "length" and f.num_output_tokens != params["max_tokens"]:
                return self.tally.problem(f"{kind}: length after {f.num_output_tokens} of {params['max_tokens']}")
        self.tally.completed += 1
        self.tally.output_tokens += sum(tokens.values())
        self.tally.latencies.append(time.monotonic() - started)
        if first is not None:
            self.tally.first_token.append(first - started)

    def expected_error(self, kind: str, exc: ServerError) -> None:
        if exc.code in KINDS[kind][1] | ALWAYS_OK:
            self.tally.errors_by_code[exc.code] += 1
        else:
            self.tally.problem(f"{kind}: unexpected error {exc.code}: {exc.message}")

    # -- the actions -----------------------------------------------------------------

    async def generate(self, client: AsyncClient, kind: str) -> None:
        r = self.rng
        prompt = self.prompt()
        params = self.params()
        if kind == "shared_prefix":
            prompt = self.shared_prefix_prompt()
        elif kind == "parallel":
            params.update(n=r.randint(2, 3), temperature=0.8)
        elif kind == "oversize":
            prompt = [r.randrange(3, self.vocab) for _ in range(self.cfg.max_prompt_tokens + r.randint(1, 200))]
        elif kind == "invalid":
            params.update(r.choice([{"temperature": -1.0}, {"top_p": 0.0}, {"n": 1000}, {"max_tokens": 0},
                                    {"top_k": "many"}, {"stop": [""]}]))
        started, first, frames = time.monotonic(), None, []
        try:
            if kind == "complete":
                whole = await client.complete(prompt, params)
                frames = [_as_output(c) for c in whole.samples]
            else:
                async with contextlib.aclosing(client.generate(prompt, params)) as stream:
                    async for out in stream:
                        first = first or time.monotonic()
                        frames.append(out)
            self.check_complete(kind, frames, params, started, first)
        except ServerError as exc:
            self.expected_error(kind, exc)

    async def abort(self, client: AsyncClient) -> None:
        self.ids += 1
        request_id = f"ab{self.ids}"
        params = self.params(max_tokens=self.cfg.max_tokens, ignore_eos=True)
        abort_after, seen, sent, last = self.rng.randint(1, 3), 0, False, None
        try:
            async for out in client.generate(self.prompt(), params, request_id=request_id):
                last, seen = out, seen + 1
                if seen == abort_after and not out.finished:
                    await client.abort(request_id)
                    sent = True
            if sent and last.finish_reason == "abort":
                self.tally.aborted += 1
            elif last.finish_reason in ("stop", "length"):  # it ended before the abort reached it
                self.tally.completed += 1
                self.tally.output_tokens += last.num_output_tokens
            else:
                self.tally.problem(f"abort: ended with {last.finish_reason!r} ({last.error})")
        except ServerError as exc:
            self.expected_error("abort", exc)

    async def disconnect(self) -> None:
        """Send requests on a fresh connection and vanish after a few frames (or none)."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            count = self.rng.randint(1, 3)
            self.tally.requests += count
            self.tally.aborted += count
            for i in range(count):
                writer.write(protocol.pack_frame({"op": "generate", "id": f"d{i}", "prompt": self.prompt(),
                                              "params": self.params(max_tokens=self.cfg.max_tokens)}))
            await writer.drain()
            # Read a few frames, but never wait for one after the last request has ended: an error frame
            # (overloaded, say) ends its request as surely as a finished output does.
            live = {f"d{i}" for i in range(count)}
            for _ in range(self.rng.randint(0, 4)):
                frame = await protocol.read_frame(reader, timeout=None)
                if frame is None:
                    break
                if frame.get("finished") or frame.get("type") == "error":
                    live.discard(frame.get("id"))
                if not live:
                    break
        finally:
            writer.transport.abort()  # no goodbye: the server must notice and abort the requests

    async def pin(self) -> None:
        """Pin what one client can: on a fresh connection, requests with every list at its limit and one frame
        whose lists are past theirs, all sent before a single answer is read."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            count = self.rng.randint(1, self.cfg.max_inflight_per_connection - 1)
            self.tally.requests += count  # one() counted the one past the limits
            params = self.params(max_tokens=self.cfg.max_tokens, **LIST_LIMITS)
            requests = {f"p{i}": params for i in range(count)}
            requests["past"] = {**params, **PAST_LIMITS}
            started = time.monotonic()
            for request_id, p in requests.items():
                writer.write(protocol.pack_frame({"op": "generate", "id": request_id, "prompt": self.prompt(),
                                                  "params": p}))
            await writer.drain()
            outputs = collections.defaultdict(list)
            while requests:
                frame = await protocol.read_frame(reader, timeout=None)
                if frame is None:
                    return self.tally.problem(f"pin: the server closed the connection, {sorted(requests)} unanswered")
                if frame["type"] == "error":
                    self.expected_error("pin", ServerError(frame["code"], frame["message"]))
                    requests.pop(frame["id"], None)
                    continue
                outputs[frame["id"]].append(protocol.output_of(frame))
                if frame["finished"]:
                    self.check_complete("pin", outputs.pop(frame["id"]), requests.pop(frame["id"]), started, None)
        finally:
            writer.transport.abort()

    async def garbage(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            if self.rng.random() < 0.5:
                body = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 64)))
                writer.write(protocol.HEADER.pack(len(body)) + b"\xc1" + body)  # 0xc1 is never valid msgpack
            else:
                writer.write(protocol.HEADER.pack(0xFFFFFFFF))
            frame = await asyncio.wait_for(protocol.read_frame(reader, timeout=None), 30)
            if frame is None or frame.get("type") != "error":
                return self.tally.problem(f"garbage: answered {frame!r}")
            self.expected_error("garbage", ServerError(frame["code"], frame["message"]))
        finally:
            writer.transport.abort()

    async def burst(self) -> None:
        """One connection sends more requests at once than its in-flight limit allows."""
        async with AsyncClient(self.path) as client:
            count = self.cfg.max_inflight_per_connection + 3
            self.tally.requests += count
            params = self.params(max_tokens=self.cfg.max_tokens, ignore_eos=True, temperature=0)
            started = time.monotonic()
            results = await asyncio.gather(*(client.complete(self.prompt(), params) for _ in range(count)),
                                           return_exceptions=True)
        for res in results:
            if isinstance(res, ServerError):
                self.expected_error("burst", res)
            elif isinstance(res, BaseException):
                self.tally.problem(f"burst: {type(res).__name__}: {res}")
            else:
                self.check_complete("burst", [_as_output(c) for c in res.samples], params, started, None)

    async def one(self, client: AsyncClient, kind: str) -> None:
        self.tally.by_kind[kind] += 1
        if kind not in ("disconnect", "burst"):  # those two count the several requests they send
            self.tally.requests += 1
        if kind == "abort":
            await self.abort(client)
        elif kind == "disconnect":
            await self.disconnect()
        elif kind == "garbage":
            await self.garbage()
        elif kind == "burst":
            await self.burst()
        elif kind == "pin":
            await self.pin()
        else:
            await self.generate(client, kind)

    async def worker(self) -> None:
        kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
        client = await AsyncClient(self.path).connect()
        try:
            while time.monotonic() < self.stop_at:
                # Up to three requests at once on this connection, so answers interleave.
                batch = self.rng.choices(kinds, weights, k=self.rng.randint(1, 3))
                try:
                    await asyncio.wait_for(asyncio.gather(*(self.one(client, k) for k in batch)),
                                           self.cfg.request_timeout)
                except asyncio.TimeoutError:
                    self.tally.hangs += 1
                    self.tally.problem(f"hang: {batch} got no last frame in {self.cfg.request_timeout} s")
                    await client.close()
                    client = await AsyncClient(self.path).connect()
                except ConnectionLost as exc:
                    self.tally.problem(f"connection lost: {exc}")
                    client = await AsyncClient(self.path).connect()
        finally:
            await client.close()


def _as_output(c):
    """A Completion sample as the one final frame it stands for."""
    from kvmux.outputs import RequestOutput
    return RequestOutput(c.request_id, c.token_ids, c.text, True, c.finish_reason, c.num_prompt_tokens,
                         c.num_output_tokens, c.error, c.index)


# -- the server process ---------------------------------------------------------------

def start_server(cfg: SoakConfig, socket_path: str, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvmux", "serve", "--socket", socket_path,
           "--num-blocks", str(cfg.num_blocks), "--block-size", str(cfg.block_size),
           "--num-host-blocks", str(cfg.num_host_blocks),
           "--max-model-len", str(cfg.max_model_len), "--max-prompt-tokens", str(cfg.max_prompt_tokens),
           "--max-tokens-limit", str(cfg.max_tokens), "--max-pending", str(cfg.max_pending),
           "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
           "--max-inflight-per-connection", str(cfg.max_inflight_per_connection), "--threads", str(cfg.threads),
           "--read-timeout", "5", "--grace-period", str(cfg.grace_period), "--drain-timeout", str(cfg.drain_timeout)]
    if cfg.model:
        cmd += ["--model", cfg.model]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


async def wait_ready(path: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        with contextlib.suppress(Exception):  # not listening yet, or still loading
            async with AsyncClient(path, connect_timeout=2) as client:
                if (await client.health())["status"] == "ok":
                    return
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become ready")
        await asyncio.sleep(0.2)


def leaks_of(stats: dict) -> dict[str, int]:
    """What is still held once the server is idle, per tier: device and host blocks (a cached block nobody
    holds counts as free; the disk tier only ever keeps such blocks), and sequences left swapped out."""
    leaks = {"device_blocks": stats["blocks_total"] - stats["blocks_free"]}
    if "host_blocks_used" in stats:
        leaks["host_blocks"] = stats["host_blocks_used"]
    if "swapped" in stats:
        leaks["swapped_sequences"] = stats["swapped"]
    return leaks


async def drained(client: AsyncClient, timeout: float = 60) -> dict:
    """Stats once no request is live and every tier is whole, or the last reading at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await client.stats()
        idle = stats["requests_live"] == 0 and stats["requests_in_flight"] == 0
        if (idle and not any(leaks_of(stats).values())) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


async def run(cfg: SoakConfig) -> dict:
    rng = random.Random(cfg.seed)
    workdir = tempfile.mkdtemp(prefix="kvsoak-", dir="/tmp")
    path, log_path = os.path.join(workdir, "s.sock"), os.path.join(workdir, "server.log")
    server = start_server(cfg, path, log_path)
    try:
        await wait_ready(path, server)
        async with AsyncClient(path) as control:
            model = await control.model()
            soak = Soak(cfg, path, model["vocab_size"], rng)
            started = time.monotonic()
            soak.stop_at = started + cfg.duration
            workers = [asyncio.create_task(soak.worker()) for _ in range(cfg.clients)]
            await asyncio.sleep(min(cfg.warmup, cfg.duration / 2))
            rss_warm = rss_mib(server.pid)
            peak = await _sample_while(workers, server.pid)
            load_seconds = time.monotonic() - started
            for w in workers:
                if w.exception() is not None:
                    soak.tally.problem(f"worker crashed: {w.exception()!r}")
            stats = await drained(control)
            # The server must still serve after all that.
            probe = await control.complete("the page table", {"max_tokens": 4, "temperature": 0, "ignore_eos": True})
            if probe.num_output_tokens != 4:
                soak.tally.problem(f"final probe: {probe}")
            stats = await drained(control)
            health = await control.health()
            rss_end = rss_mib(server.pid)
            flood, flood_unsent = await unread_flood(path, control)
    finally:
        shutdown_started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        shutdown_bound = cfg.grace_period + cfg.drain_timeout
        try:
            exit_status = server.wait(timeout=shutdown_bound + 60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_status = "killed"
        shutdown_seconds = time.monotonic() - shutdown_started
    flood.transport.abort()
    t = soak.tally
    leaks = leaks_of(stats)
    growth = rss_end - rss_warm
    host_pool_mib = stats.get("host_blocks_total", 0) * model["block_bytes"] / 2**20
    allowed = cfg.rss_bound_mib + host_pool_mib
    summary = {
        "model": model["model"], "model_path": model["path"], "config": asdict(cfg),
        "load_seconds": round(load_seconds, 1), "requests": t.requests, "completed": t.completed,
        "aborted_or_disconnected": t.aborted, "errors": sum(t.errors_by_code.values()),
        # Requests that ended neither complete, nor aborted on purpose, nor with an expected error.
        "unaccounted": t.requests - t.completed - t.aborted - sum(t.errors_by_code.values()),
        "output_tokens": t.output_tokens,
        "tokens_per_s": round(t.output_tokens / load_seconds, 1),
        "requests_by_kind": dict(t.by_kind), "errors_by_code": dict(t.errors_by_code),
        "latency_p50_s": _round(percentile(t.latencies, 0.5)), "latency_p99_s": _round(percentile(t.latencies, 0.99)),
        "first_token_p50_s": _round(percentile(t.first_token, 0.5)),
        "first_token_p99_s": _round(percentile(t.first_token, 0.99)),
        "hangs": t.hangs, "problems": len(t.problems), "problem_samples": t.problems[:20],
        "leaks": leaks, "leaks_found": sum(leaks.values()),
        "healthy": health["status"] == "ok", "server_exit_status": exit_status,
        "shutdown_seconds": round(shutdown_seconds, 1), "shutdown_bound_s": shutdown_bound,
        "shutdown_unsent_bytes": flood_unsent,
        "rss_mib_after_warmup": round(rss_warm, 1), "rss_mib_peak": round(peak, 1), "rss_mib_end": round(rss_end, 1),
        "rss_growth_mib": round(growth, 1), "rss_bound_mib": cfg.rss_bound_mib,
        "host_pool_mib": round(host_pool_mib, 1), "rss_growth_allowed_mib": round(allowed, 1),
        "server_stats": {k: stats[k] for k in ("steps", "preemptions", "requests_admitted", "requests_rejected",
                                               "prefix_cache_hit_rate", "connections_total", "frames_received",
                                               "errors_sent") if k in stats},
    }
    checks = {"no leaks": summary["leaks_found"] == 0, "no hangs": t.hangs == 0, "no problems": not t.problems,
              "healthy": summary["healthy"], "all accounted": summary["unaccounted"] == 0,
              "rss bounded": growth <= allowed, "clean exit": exit_status == 0,
              "shutdown met a client that reads nothing": flood_unsent > 0,
              "shutdown bounded": shutdown_seconds <= shutdown_bound + SHUTDOWN_SLACK}
    summary["failed_checks"] = [name for name, ok in checks.items() if not ok]
    summary["passed"] = not summary["failed_checks"]
    return summary


async def unread_flood(path: str, control: AsyncClient) -> tuple[asyncio.StreamWriter, int]:
    """Connect a client that sends a generate and a flood of stats frames and reads nothing, and wait until the
    server holds answers it cannot send: shutdown must not wait for them. Returns the connection (to be kept
    open until the server has gone) and the server's unsent bytes."""
    reader, writer = await asyncio.open_unix_connection(path)
    frames = [{"op": "generate", "id": "g", "prompt": "the page table", "params": {"max_tokens": 16}}]
    frames += [{"op": "stats", "id": f"s{i}"} for i in range(400)]
    writer.write(b"".join(map(protocol.pack_frame, frames)))
    await writer.drain()
    deadline = time.monotonic() + 60
    while not (stats := await control.stats())["unsent_bytes"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return writer, stats["unsent_bytes"]


async def _sample_while(workers: list[asyncio.Task], pid: int) -> float:
    """Wait for the workers, noting the server's peak resident memory meanwhile."""
    peak = rss_mib(pid)
    while not all(w.done() for w in workers):
        await asyncio.wait(workers, timeout=1.0)
        peak = max(peak, rss_mib(pid))
    return peak


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def print_summary(s: dict) -> None:
    print(f"soak: {s['model']} for {s['load_seconds']} s, {s['config']['clients']} clients")
    print(f"  requests {s['requests']}: completed {s['completed']}, aborted/disconnected "
          f"{s['aborted_or_disconnected']}, expected errors {s['errors']}, unaccounted {s['unaccounted']}; "
          f"output tokens {s['output_tokens']} ({s['tokens_per_s']}/s)")
    print(f"  by kind: {s['requests_by_kind']}")
    print(f"  errors by code: {s['errors_by_code']}")
    print(f"  latency p50 {s['latency_p50_s']} s, p99 {s['latency_p99_s']} s; "
          f"first token p50 {s['first_token_p50_s']} s, p99 {s['first_token_p99_s']} s")
    print(f"  server: {s['server_stats']}")
    print(f"  RSS after warm-up {s['rss_mib_after_warmup']} MiB, peak {s['rss_mib_peak']} MiB, end {s['rss_mib_end']} "
          f"MiB: growth {s['rss_growth_mib']} MiB (bound {s['rss_bound_mib']} MiB + host pool {s['host_pool_mib']} "
          f"MiB = {s['rss_growth_allowed_mib']} MiB)")
    print(f"  leaks found = {s['leaks_found']} {s['leaks']}, hangs = {s['hangs']}, problems = {s['problems']}, "
          f"healthy = {s['healthy']}, server exit = {s['server_exit_status']}")
    print(f"  shutdown with a client reading nothing ({s['shutdown_unsent_bytes']} bytes unsent): "
          f"{s['shutdown_seconds']} s (bound: grace + drain = {s['shutdown_bound_s']} s)")
    for p in s["problem_samples"]:
        print(f"    problem: {p}")
    print("PASSED" if s["passed"] else "FAILED: " + ", ".join(s["failed_checks"]))


def main(argv: list[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        kind = type(value) if value is not None else str
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value, help=f"[default: {value}]")
    cfg = SoakConfig(**vars(parser.parse_args(argv)))
    summary = asyncio.run(run(cfg))
    print_summary(summary)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {cfg.out}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
