"""The options several commands share, read from EngineConfig and SamplingParams so that the command line,
the Python API and the server agree on names, allowed values and defaults; the prompt a command is given; and
the connection to the server that --socket names."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

from kvmux.config import ConfigError, EngineConfig
from kvmux.sampling import SamplingParams, StructuredOutputs
from kvmux.serve.unix_socket import default_socket_path

DTYPE_SPELLINGS = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def dtype_name(text: str) -> str:
    name = DTYPE_SPELLINGS.get(text.lower(), text.lower())
    if name in ("float16", "fp16", "half"):
        raise argparse.ArgumentTypeError("float16 is not supported: the CPU kernels have no float16 path; "
                                         "use bfloat16 (bf16) for half the memory of float32")
    return name


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, like '{{\"method\": \"ngram\"}}': {text!r}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        help, choices = f.metadata["help"], f.metadata["choices"] or None
        if f.type == "bool":  # --flag / --no-flag
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=help)
            continue
        kind = {"str": str, "int": int, "float": float, "dict": json_object}[f.type.split(" | ")[0]]
        if f.name == "dtype":
            kind = dtype_name
        group.add_argument(flag(f.name), type=kind, default=f.default, choices=choices, help=help,
                           metavar="{" + ",".join(map(str, choices)) + "}" if choices else None)


def engine_options(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=d.max_tokens,
                       help="most tokens to generate (default: as many as the context leaves)")
    group.add_argument("--temperature", type=float, default=d.temperature, help="0 for greedy")
    group.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k likeliest tokens, 0 = all")
    group.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling: the likeliest tokens "
                                                                    "holding this much probability")
    group.add_argument("--min-p", type=float, default=d.min_p,
                       help="drop tokens less likely than this times the likeliest, 0 = off")
    group.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                       help="lower the logit of every token already generated")
    group.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                       help="lower a token's logit by this per time it was generated")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    structured = parser.add_argument_group(
        "structured output", "constrain the output (one of these; every token the constraint forbids is masked)")
    one = structured.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="SCHEMA", help="a JSON schema the output is valid against: its text, "
                                                             "or @FILE")
    one.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    one.add_argument("--regex", help="a regular expression the whole output matches")
    one.add_argument("--choice", action="append", help="the output is one of these strings (repeat the flag)")
    one.add_argument("--grammar", help="a grammar the output is a sentence of, Lark or llama.cpp's GBNF: its text, "
                                       "or @FILE")


def _text_or_file(name: str, value: str) -> str:
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except OSError as exc:
        raise ConfigError(name, f"cannot read {value[1:]}: {exc.strerror}") from None


def structured_outputs(args: argparse.Namespace) -> StructuredOutputs | None:
    if args.json_schema is not None:
        text = _text_or_file("json_schema", args.json_schema)
        try:
            return StructuredOutputs(json=json.loads(text))
        except ValueError as exc:
            raise ConfigError("json_schema", f"is not valid JSON: {exc}") from None
    if args.grammar is not None:
        return StructuredOutputs(grammar=_text_or_file("grammar", args.grammar))
    if args.json_object or args.regex is not None or args.choice:
        return StructuredOutputs(json_object=args.json_object, regex=args.regex, choice=args.choice)
    return None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop,
                            ignore_eos=args.ignore_eos, structured_outputs=structured_outputs(args))
    try:
        params.validate()
    except ValueError as exc:  # e.g. "max_tokens must be an integer >= 1": name the flag
        name, _, problem = str(exc).partition(" ")
        raise ConfigError(name, problem) from None
    return params


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


def add_socket_arg(parser: argparse.ArgumentParser, wait: bool = True) -> None:
    parser.add_argument("--socket", default=default_socket_path(), help="the server's Unix socket")
    if wait:
        parser.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                            help="how long to wait for the server to come up (it accepts once its model is "
                                 "loaded; the first start converts the model and takes longer)")


async def connect(args: argparse.Namespace):
    """An AsyncClient connected to --socket, retrying until --wait runs out."""
    from kvmux.serve.client import AsyncClient, ConnectionFailed

    deadline = time.monotonic() + args.wait
    while True:
        try:
            return await AsyncClient(args.socket).connect()
        except ConnectionFailed:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)
