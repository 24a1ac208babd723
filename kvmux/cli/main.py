"""The `kvmux` command line: generate, chat, serve, client, stats, examples, bench.

Every engine option comes from kvmux.config.EngineConfig and every sampling
option's default from kvmux.sampling.SamplingParams, so the command line, the
Python API and the server agree on names, allowed values and defaults. Bad
usage is refused before anything loads, in one line that names the flag.
"""
from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kvmux.cache.disk_store import StoreLocked
from kvmux.cli.options import (
    add_engine_args,
    add_prompt_args,
    add_sampling_args,
    add_socket_arg,
    build_prompt,
    connect,
    engine_options,
    flag,
    sampling_params,
)
from kvmux.config import ConfigError
from kvmux.outputs import KvmuxError
from kvmux.serve import protocol
from kvmux.serve.unix_socket import SocketInUse, default_socket_path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout, where examples/ and bench/ live


class Parser(argparse.ArgumentParser):
    """argparse that suggests the option a mistyped one was meant to be (`--max_tokens` -> `--max-tokens`)."""

    commands: dict[str, argparse.ArgumentParser] = {}  # the subcommands' parsers, by name

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Reported by the subcommand given, whose options the mistyped one was meant to be.
            parser = self.commands.get(getattr(parsed, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{suggestion(parser, extras)}")
        return parsed

    def error(self, message: str):
        # One line that says what is wrong, and where to look, instead of the whole usage.
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def suggestion(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for extra in extras:
        if extra.startswith("-"):
            close = difflib.get_close_matches(extra.split("=")[0].replace("_", "-"), options, n=1, cutoff=0.6)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once, after its help, where it has one worth showing."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS, []) and "%(default)" not in help \
                and action.option_strings:
            help += " [default: %(default)s]"
        return help


async def stream_to_terminal(outputs) -> int:
    """Print a stream of RequestOutput deltas, then a one-line summary on stderr."""
    started = time.perf_counter()
    first = None
    async for out in outputs:
        first = first or time.perf_counter()
        sys.stdout.write(out.text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - started
    decode_rate = (out.num_output_tokens - 1) / (time.perf_counter() - first) if out.num_output_tokens > 1 else 0
    print(file=sys.stdout)
    print(f"[{out.num_prompt_tokens} prompt tokens, {out.num_output_tokens} output tokens in {elapsed:.2f} s, "
          f"first token after {first - started:.2f} s, {decode_rate:.1f} tokens/s, finish: {out.finish_reason}]",
          file=sys.stderr)
    if out.error:
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    return 0


async def _generate(args: argparse.Namespace) -> int:
    from kvmux.engine.supervisor import Engine

    prompt, params = build_prompt(args), sampling_params(args)
    async with Engine(**engine_options(args)) as engine:
        return await stream_to_terminal(engine.generate(prompt, params))


def check_socket_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError("socket", f"{path}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("socket", f"{path}: the folder {folder} is not writable by this user")


async def _serve(args: argparse.Namespace) -> int:
    from kvmux.engine.supervisor import Engine
    from kvmux.serve import unix_socket
    from kvmux.serve.server import Server, ServerOptions

    serve_http = args.port is not None or args.host is not None
    socket_path = args.socket or (None if serve_http else default_socket_path())
    # Fail before the model load, not after it.
    if socket_path:
        check_socket_folder(socket_path)
        unix_socket.claim(socket_path)
    if serve_http:
        from kvmux.serve.http import HttpOptions, HttpServer, listen

        http_options = HttpOptions(args.host or "127.0.0.1", 8000 if args.port is None else args.port, args.api_key,
                                   args.served_model_name, args.max_body_bytes, args.read_timeout, args.write_timeout,
                                   args.grace_period, args.max_connections)
        try:
            http_socket = listen(http_options.host, http_options.port)
        except OSError as exc:
            raise ConfigError("port", f"{http_options.port} on {http_options.host}: cannot listen ({exc}); choose "
                                      f"another --host or --port") from None
    async with Engine(**engine_options(args)) as engine:
        servers = []
        if socket_path:
            servers.append(Server(engine, ServerOptions(
                socket_path, args.socket_mode, args.max_frame_bytes, args.read_timeout, args.grace_period,
                args.max_inflight_per_connection, args.write_timeout, args.drain_timeout, args.max_connections)))
            await servers[-1].start()
            print(f"kvmux: serving {engine.loaded.name} on {socket_path}", file=sys.stderr, flush=True)
        if serve_http:
            servers.append(HttpServer(engine, http_options, http_socket))
            await servers[-1].start()
            print(f"kvmux: serving {servers[-1].model} on http://{http_options.host}:{servers[-1].port}/v1 "
                  "(OpenAI API)", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"kvmux: shutting down (grace period {args.grace_period:g} s, drain timeout {args.drain_timeout:g} s)",
              file=sys.stderr, flush=True)
        await asyncio.gather(*(server.shutdown() for server in servers))
    return 0


async def _client(args: argparse.Namespace) -> int:
    prompt, params = build_prompt(args), sampling_params(args)
    async with await connect(args) as client:
        return await stream_to_terminal(client.generate(prompt, params))


async def _stats(args: argparse.Namespace) -> int:
    async with await connect(args) as client:
        stats = await client.stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        width = max(map(len, stats))
        for key in sorted(stats):
            value = stats[key]
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    """This machine's share of a tensor-parallel engine's ranks, until the engine stops them."""
    from kvmux.parallel.driver import Launch, start_ranks

    launch = Launch(args.tensor_parallel_size, args.distributed_init_method, args.nnodes)
    if not 1 <= args.node_rank < args.nnodes:
        raise ConfigError("node_rank", f"must be in [1, {args.nnodes}) (node 0 runs the engine itself)")
    ranks = start_ranks(launch, args.distributed_init_method, args.node_rank, args.model)
    print(f"kvmux: {len(ranks)} ranks of {launch.size} joining {args.distributed_init_method}", file=sys.stderr,
          flush=True)
    codes = [rank.wait() for rank in ranks]
    return max(codes)


def _chat(args: argparse.Namespace) -> int:
    from kvmux.cli.chat import run_chat

    return run_chat(args, sampling_params(args))


def _run_from_checkout(folder: str, argv: list[str]) -> int:
    """`python -m <folder> argv` from the source checkout, where examples/ and bench/ live, in the caller's
    folder, so relative paths mean what the caller meant."""
    if not (ROOT / folder / "__main__.py").is_file():
        print(f"kvmux: error: no {folder}/ folder beside the package in {ROOT}; it ships with the source checkout",
              file=sys.stderr)
        return 2
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, "-m", folder, *argv], env={**os.environ, "PYTHONPATH": path})


def _examples(args: argparse.Namespace) -> int:
    return _run_from_checkout("examples", args.passed)


def _bench(args: argparse.Namespace) -> int:
    return _run_from_checkout("bench", args.passed)


def _run(args: argparse.Namespace) -> int:
    if not asyncio.iscoroutinefunction(args.func):
        return args.func(args)
    if args.command == "serve":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(args.func(args))
    return asyncio.run(args.func(args))


def package_version() -> str:
    try:
        return version("kvmux")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cache(args: argparse.Namespace) -> int:
    from kvmux.cache import disk_store

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"{args.dir} is no folder")
    if args.action == "clear":
        print(f"deleted {disk_store.clear(args.dir)} store(s) in {args.dir}")
        return 0
    stores = disk_store.describe(args.dir)
    if args.json:
        print(json.dumps(stores, indent=1))
    elif not stores:
        print(f"{args.dir}: no stores")
    for s in [] if args.json else stores:
        print(f"{s['fingerprint']}  {s['name']}  {s['dtype']}  block_size {s['block_size']}  "
              f"{s['journal_records']} journal records  {s['disk_bytes'] / 2**20:.1f} MiB on disk  ({s['model']})")
    return 0


def build_parser() -> Parser:
    parser = Parser(
        prog="kvmux", formatter_class=HelpFormatter,
        description="kvmux: an LLM inference engine whose KV cache is a pool of fixed-size blocks multiplexed "
                    "across concurrent requests (paged KV, continuous batching, chunked prefill, preemption).",
        epilog="Run `kvmux COMMAND --help` for a command's options.",
    )
    parser.commands = {}
    parser.add_argument("--version", action="version", version=f"kvmux {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, description: str) -> Parser:
        parser.commands[name] = commands.add_parser(name, help=help, description=description,
                                                    formatter_class=HelpFormatter)
        return parser.commands[name]

    gen = command("generate", "generate text from a prompt, streaming to the terminal",
                  "Generate text from a prompt and stream it to the terminal. The prompt goes through the model's "
                  "chat template unless --raw is given.")
    add_prompt_args(gen)
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    chat = command("chat", "chat with a model in the terminal, on a local engine or a running server (socket or "
                           "HTTP)",
                   "A multi-turn chat. Replies stream as they are generated; the conversation is kept and sent "
                   "whole each turn (the prefix cache makes that cheap). Commands: /clear forgets the "
                   "conversation, /system TEXT sets the system message, /params shows the sampling parameters "
                   "(/params temperature=0.2 sets them), /stats shows the engine's statistics. Ctrl-C stops "
                   "the reply being generated; Ctrl-D leaves.")
    chat.add_argument("--socket", default=None,
                      help="talk to the `kvmux serve` on this socket instead of loading a model here")
    chat.add_argument("--url", default=None,
                      help="talk to an OpenAI-compatible server instead (`kvmux serve --port`), e.g. "
                           "http://127.0.0.1:8000")
    chat.add_argument("--api-key", default=os.environ.get("KVMUX_API_KEY"),
                      help="with --url: the server's API key (default: $KVMUX_API_KEY)")
    chat.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                      help="with --socket: how long to wait for the server to come up")
    chat.add_argument("--system", default=None, help="the conversation's system message")
    add_sampling_args(chat)
    add_engine_args(chat)
    chat.set_defaults(func=_chat)

    serve = command("serve", "serve a model over HTTP (OpenAI's API) and/or a Unix socket",
                    "Load a model and serve it: with --port (or --host), over HTTP with OpenAI's API "
                    "(docs/http.md); with --socket, or when no port is given, on a Unix socket (docs/protocol.md); "
                    "both at once from one engine. It prints 'kvmux: serving MODEL on ...' once it accepts "
                    "requests; SIGINT/SIGTERM stop it gracefully.")
    both = serve.add_argument_group("both servers")
    both.add_argument("--read-timeout", type=float, default=protocol.DEFAULT_READ_TIMEOUT,
                      help="seconds a client has to finish sending a frame (socket) or a request body (HTTP) it "
                           "started")
    both.add_argument("--write-timeout", type=float, default=60.0,
                      help="seconds a client may leave answers unread before it is disconnected")
    both.add_argument("--grace-period", type=float, default=10.0,
                      help="seconds in-flight requests get to finish on shutdown")
    both.add_argument("--drain-timeout", type=float, default=5.0,
                      help="on shutdown, seconds after the grace period for the last answers to reach clients; "
                           "connections not drained by then are cut")
    both.add_argument("--max-connections", type=int, default=512,
                      help="connections open at once, on each server (the socket refuses more with "
                           "too_many_connections, HTTP with 503)")
    http = serve.add_argument_group("HTTP")
    http.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1, loopback only)")
    http.add_argument("--port", type=int, default=None,
                      help="port to listen on, 0 for any free one (default: 8000 when --host is given; no HTTP "
                           "without either)")
    http.add_argument("--api-key", default=os.environ.get("KVMUX_API_KEY"),
                      help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize "
                           "(default: $KVMUX_API_KEY, else none)")
    http.add_argument("--served-model-name", default=None,
                      help="the model's name in the API (default: the model's folder or file stem)")
    http.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 past it)")
    sock = serve.add_argument_group("Unix socket")
    sock.add_argument("--socket", default=None,
                      help=f"serve on this Unix socket (default: {default_socket_path()} when no --port is given)")
    sock.add_argument("--socket-mode", type=lambda s: int(s, 8), default="600", metavar="OCTAL",
                      help="permissions of the socket file (600: only this user)")
    sock.add_argument("--max-frame-bytes", type=int, default=protocol.DEFAULT_MAX_FRAME,
                      help="largest frame a client may send")
    sock.add_argument("--max-inflight-per-connection", type=int, default=256,
                      help="requests one connection may have in flight (too_many_requests)")
    add_engine_args(serve)
    serve.set_defaults(func=_serve)

    client = command("client", "generate text through a running server, streaming to the terminal",
                     "Send a prompt to a running `kvmux serve` and stream the answer. The prompt goes through the "
                     "model's chat template unless --raw is given.")
    add_prompt_args(client)
    add_socket_arg(client)
    add_sampling_args(client)
    client.set_defaults(func=_client)

    stats = command("stats", "print a running server's statistics",
                    "Print the statistics of a running `kvmux serve`: the KV pool, the request counters, the "
                    "prefix cache, preemptions and the server's connections.")
    add_socket_arg(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")
    stats.set_defaults(func=_stats)

    cache = command("cache", "show or empty a disk_cache_dir (the disk tier that outlives the engine)",
                    "info: the stores in DIR (one per model and settings) with their size and blocks; clear: delete "
                    "them (refused while an engine uses DIR).")
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument("dir", metavar="DIR", help="the engine's --disk-cache-dir")
    cache.add_argument("--json", action="store_true", help="info as JSON")
    cache.set_defaults(func=_cache)

    worker = command("worker", "run this machine's ranks of a tensor-parallel engine started elsewhere",
                     "Join the engine that `kvmux serve --tensor-parallel-size N --nnodes K "
                     "--distributed-init-method tcp://HOST:PORT` started on node 0: this machine runs N / K of "
                     "its ranks, each with its slice of the model, until the engine stops them. The model and "
                     "settings must be the engine's; a rank that loads anything else is refused at startup.")
    worker.add_argument("--tensor-parallel-size", type=int, required=True, help="the engine's number of ranks")
    worker.add_argument("--nnodes", type=int, required=True, help="machines the ranks span")
    worker.add_argument("--node-rank", type=int, required=True, help="this machine's index, 1..nnodes-1")
    worker.add_argument("--distributed-init-method", required=True, help="the engine's tcp://HOST:PORT")
    worker.add_argument("--model", default=None, help="the model as this machine has it (default: the engine's "
                                                       "path)")
    worker.set_defaults(func=_worker)

    # The runners parse their own options (--help included): everything after the command passes through.
    for name, func, help in (("examples", _examples, "list or run the examples (`kvmux examples --help`)"),
                             ("bench", _bench, "benchmark kvmux against transformers (`kvmux bench --help`)")):
        runner = commands.add_parser(name, help=help, add_help=False, prefix_chars="+")
        runner.add_argument("passed", nargs=argparse.REMAINDER)
        runner.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"kvmux: error: {flag(exc.name)} {exc.problem}", file=sys.stderr)
        return 2
    except (KvmuxError, ValueError, FileNotFoundError, SocketInUse, StoreLocked) as exc:
        print(f"kvmux: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
