"""`kvmux chat`: a multi-turn chat in the terminal, on a local engine or a running server (its Unix socket,
or its OpenAI-compatible HTTP API).

The engine (or the client) runs on an event loop in a background thread; the
terminal belongs to the main thread, so Ctrl-C there interrupts whatever the
main thread waits for: at the prompt it clears the line, during a reply it
stops the reply (closing its stream aborts the request and frees its blocks)
and the chat goes on. Ctrl-D leaves.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import threading

from kvmux.cli.options import connect, engine_options
from kvmux.loop_thread import LoopThread
from kvmux.outputs import RequestOutput
from kvmux.sampling import SamplingParams

PROMPT = "you> "
HELP = """commands:
  /clear           forget the conversation
  /system [TEXT]   set the system message (none without TEXT); the conversation starts over
  /params [k=v..]  show the sampling parameters, or set some (e.g. /params temperature=0.2 max_tokens=64)
  /stats           the engine's statistics
  /help            this list
Ctrl-C stops a reply being generated; Ctrl-D leaves."""


class Chat:
    def __init__(self, loop: LoopThread, backend, params: SamplingParams, system: str | None) -> None:
        self.loop, self.backend, self.params = loop, backend, params
        self.system = system
        self.history: list[dict] = []

    def messages(self, user: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user}]

    async def _reply(self, messages: list[dict], finished: threading.Event) -> tuple[str, str | None]:
        text, reason = "", None
        try:
            async with contextlib.aclosing(self.backend.generate(messages, self.params)) as stream:
                async for out in stream:
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
                    text, reason = text + out.text, out.finish_reason
                    if out.error:
                        print(f"\n[error: {out.error}]", flush=True)
            return text, reason
        finally:
            finished.set()

    def turn(self, user: str) -> None:
        finished = threading.Event()
        future = self.loop.submit(self._reply(self.messages(user), finished))
        try:
            text, reason = future.result()
        except KeyboardInterrupt:
            future.cancel()  # the stream closes, which aborts the request
            finished.wait()
            print("\n[stopped]", flush=True)
            return
        print(flush=True)
        if reason in ("stop", "length"):
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        if name == "/clear":
            self.history = []
            print("[conversation cleared]")
        elif name == "/system":
            self.system, self.history = rest.strip() or None, []
            print(f"[system message {'set' if self.system else 'cleared'}; conversation cleared]")
        elif name == "/params":
            if rest.strip():
                self.params = updated(self.params, rest.split())
            print(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.params).items()))
        elif name == "/stats":
            stats = self.loop.run(self.backend.stats())
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(stats.items())))
        elif name == "/help":
            print(HELP)
        else:
            print(f"[unknown command {name}; /help lists them]")

    def run(self, title: str) -> None:
        print(f"kvmux chat with {title}. /help lists commands; Ctrl-C stops a reply, Ctrl-D leaves.")
        while True:
            try:
                line = input(PROMPT).strip()
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            try:
                if line.startswith("/"):
                    self.command(line)
                elif line:
                    self.turn(line)
            except ValueError as exc:
                print(f"[{exc}]")
            except KeyboardInterrupt:  # between the prompt and the reply's stream: nothing to stop yet
                print("\n[stopped]", flush=True)


def updated(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    """params with `name=value` assignments applied (values read as JSON where they parse, else as text)."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    changes = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"{item!r} is not name=value for a sampling parameter ({', '.join(sorted(names))})")
        try:
            changes[name] = json.loads(raw)
        except json.JSONDecodeError:
            changes[name] = raw
    new = dataclasses.replace(params, **changes)
    new.validate()
    return new


class HttpBackend:
    """An OpenAI-compatible server (`kvmux serve --port`, or any other) as the chat's backend, through the
    `openai` SDK: a reply streams as chat-completion chunks, and closing the stream drops the connection,
    which aborts the request on the server."""

    def __init__(self, url: str, api_key: str | None) -> None:
        try:
            from openai import AsyncOpenAI
        except ImportError:
            raise ValueError("kvmux chat --url needs the openai package: pip install openai") from None
        self.base = url.rstrip("/").removesuffix("/v1") + "/v1"
        self.client = AsyncOpenAI(base_url=self.base, api_key=api_key or "unused", max_retries=0)
        self.name = ""

    async def model(self) -> dict:
        models = await self.client.models.list()
        self.name = models.data[0].id
        return {"model": self.name}

    async def generate(self, messages: list[dict], params: SamplingParams):
        stream = await self.client.chat.completions.create(
            model=self.name, messages=messages, stream=True, max_tokens=params.max_tokens,
            temperature=params.temperature, top_p=params.top_p, seed=params.seed, stop=params.stop or None,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            extra_body={"top_k": params.top_k, "min_p": params.min_p, "ignore_eos": params.ignore_eos,
                        "stop_token_ids": params.stop_token_ids})
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    yield RequestOutput("", [], choice.delta.content or "", choice.finish_reason is not None,
                                        choice.finish_reason, 0, 0)

    async def stats(self) -> dict:
        """The server's kvmux_* gauges and counters, from its Prometheus /metrics."""
        response = await self.client.get(self.base.removesuffix("/v1") + "/metrics", cast_to=str)
        values = {}
        for line in response.splitlines():
            match = re.fullmatch(r"kvmux_(\w+?)(?:\{(.*)\})? (\S+)", line)
            if match and not match.group(1).endswith("_bucket"):  # kvmux_sequences{state="running"} -> sequences_running
                name = "_".join([match.group(1), *re.findall(r'="([^"]*)"', match.group(2) or "")])
                values[name] = float(match.group(3))
        return values

    async def close(self) -> None:
        await self.client.close()


def run_chat(args: argparse.Namespace, params: SamplingParams) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    loop = LoopThread("kvmux-chat")
    backend = None
    try:
        if args.url:
            backend = HttpBackend(args.url, args.api_key)
            title = f"{loop.run(backend.model())['model']} at {backend.base}"
        elif args.socket:
            backend = loop.run(connect(args))
            title = f"{loop.run(backend.model())['model']} on {args.socket}"
        else:
            from kvmux.engine.supervisor import Engine

            backend = Engine(**engine_options(args))
            loop.run(backend.start())
            title = backend.loaded.name
        Chat(loop, backend, params, args.system).run(title)
        return 0
    finally:
        if backend is not None:
            loop.run(backend.close() if args.url or args.socket else backend.stop())
        loop.close()
