"""Structured outputs: constraints compiled by llguidance, one matcher per running sample, and its token masks.

Admission compiles a request's constraint (`Constraints.compile`) on a thread of its own, never on the event
loop, under a size and a time limit, and refuses what does not compile as invalid_params. Compiled constraints
are cached by their text: a request holds its entry from admission until it has finished (`acquire` /
`release`), and an entry nobody holds is dropped once more than `CACHE_ENTRIES` are kept.

Decode gives each running sample a matcher (`Constraints.matcher`): a copy of the compiled one that has
consumed the sample's output tokens so far. Since that state is rebuilt from the tokens alone, a sample keeps
its constraint through whatever decode already does to it — a recompute or a swap, a fork for n > 1 — and
decode keeps matchers only for the samples it runs (`retain`). A step's masks are filled (`fill`) on another
thread while its forward runs; the runner waits for them only to sample.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvmux.sampling import StructuredOutputs

if TYPE_CHECKING:
    import llguidance as llg

CACHE_ENTRIES = 64  # compiled constraints kept while no request holds them


class ConstraintError(ValueError):
    """The constraint cannot be used: it does not compile, or is too large or too slow to."""


@dataclass
class _Entry:
    matcher: llg.LLMatcher  # compiled, nothing consumed: copied for every sample
    holders: int = 0


def constraint_key(constraint: StructuredOutputs) -> str:
    """The constraint as text: what the cache is keyed by, and what its size limit counts."""
    (kind,) = constraint.fields_set()
    value = getattr(constraint, kind)
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConstraintError(f"structured_outputs.json is not valid JSON: {exc}") from None
    # Not sorted: the order of a schema's properties is the order the output writes them in.
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"{kind}:{text}"


def _grammar(key: str) -> str:
    """llguidance's grammar for a constraint key (raises ValueError where llguidance refuses it outright)."""
    import llguidance as llg

    kind, text = key.split(":", 1)
    if kind == "json":
        schema = json.loads(text)
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        # Compact JSON: a flexible-whitespace grammar lets a weak model emit blank lines until max_tokens.
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llg.grammar_from("choice", json.loads(text))
    return llg.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark


class Constraints:
    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_ids: set[int], max_bytes: int,
                 compile_timeout: float) -> None:
        # Asked for on first use: a 262k-token vocabulary's JSON is 33 MB, and writing it out costs 120 MB more
        # for a moment, which an engine that never sees a structured request should not pay.
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size  # the logits' width: masks cover it all
        self.eos_ids = sorted(eos_ids)
        self.max_bytes = max_bytes
        self.compile_timeout = compile_timeout
        self._tokenizer: llg.LLTokenizer | None = None  # built on first use (0.2 s for a 49k vocabulary)
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="kvmux-grammar")
        self._masker = ThreadPoolExecutor(1, thread_name_prefix="kvmux-masks")
        self._llg_executor: llg.LLExecutor | None = None
        self.cache: OrderedDict[str, _Entry] = OrderedDict()
        self.matchers: dict[str, tuple[llg.LLMatcher, int]] = {}  # seq_id -> (matcher, output tokens consumed)
        # Statistics.
        self.compiled = 0
        self.cache_hits = 0
        self.refused = 0
        self.compile_seconds = 0.0
        self.mask_seconds = 0.0
        self.masks_filled = 0

    # -- admission ---------------------------------------------------------------

    async def compile(self, constraint: StructuredOutputs) -> str:
        """The constraint's cache key, compiled (or found compiled) and held for the caller; raises
        ConstraintError naming what is wrong."""
        key = constraint_key(constraint)
        size = len(key.encode()) - len(key.split(":", 1)[0]) - 1
        if size > self.max_bytes:
            self.refused += 1
            raise ConstraintError(f"structured_outputs.{key.split(':', 1)[0]} is {size} bytes, over this engine's "
                                  f"limit of {self.max_bytes} (structured_max_bytes)")
        entry = self.cache.get(key)
        if entry is None:
            started = time.perf_counter()
            task = asyncio.get_running_loop().run_in_executor(self._compiler, self._compile, key)
            try:
                matcher = await asyncio.wait_for(asyncio.shield(task), self.compile_timeout)
            except asyncio.TimeoutError:
                self.refused += 1
                raise ConstraintError(f"structured_outputs did not compile within {self.compile_timeout:g} s "
                                      f"(structured_compile_timeout); simplify it") from None
            except ConstraintError:
                self.refused += 1
                raise
            finally:
                self.compile_seconds += time.perf_counter() - started
            self.compiled += 1
            entry = self.cache.get(key)  # a request for the same text may have compiled it meanwhile
            if entry is None:
                entry = self.cache[key] = _Entry(matcher)
        else:
            self.cache_hits += 1
        self.cache.move_to_end(key)
        entry.holders += 1
        self._trim()
        return key

    def _compile(self, key: str) -> llg.LLMatcher:
        """On the compiler thread: llguidance releases the GIL while it works (imported here, on the first
        constraint: a process that never sees one does not hold the library, 2 MB)."""
        import llguidance as llg

        if self._tokenizer is None:
            self._tokenizer = llg.LLTokenizer(self.tokenizer_json(), n_vocab=self.vocab_size, eos_token=self.eos_ids)
        kind = key.split(":", 1)[0]
        try:
            grammar = _grammar(key)
        except ValueError as exc:
            raise ConstraintError(f"structured_outputs.{kind}: {exc}") from None
        # Short errors: the verbose ones append the parser's state and the whole grammar.
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0,
                                limits=llg.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            error = matcher.get_error().removesuffix("<non-verbose/>").strip()
            raise ConstraintError(f"structured_outputs.{kind}: {error}")
        return matcher

    def release(self, key: str) -> None:
        """A request that held `key` has finished."""
        self.cache[key].holders -= 1
        self._trim()

    def _trim(self) -> None:
        idle = [k for k, e in self.cache.items() if e.holders == 0]  # coldest first
        for key in idle[:max(0, len(idle) - CACHE_ENTRIES)]:
            del self.cache[key]

    # -- decode ----------------------------------------------------------------------

    def matcher(self, seq_id: str, key: str, output_ids: list[int]) -> llg.LLMatcher:
        """The sample's matcher, having consumed exactly its output tokens; raises RuntimeError where the tokens
        break the constraint (which the masks never allow)."""
        matcher, consumed = self.matchers.get(seq_id) or (self.cache[key].matcher.deep_copy(), 0)
        if consumed > len(output_ids):  # tokens taken back: start over
            matcher, consumed = self.cache[key].matcher.deep_copy(), 0
        for token in output_ids[consumed:]:
            if matcher.is_stopped() or not matcher.consume_token(token):
                break
        self.matchers[seq_id] = (matcher, len(output_ids))
        if matcher.is_error():
            raise RuntimeError(f"the output left its constraint: {matcher.get_error()}")
        return matcher

    def retain(self, seq_ids) -> None:
        """Forget the matchers of samples no longer running (finished, aborted, preempted: rebuilt if they return)."""
        for seq_id in self.matchers.keys() - set(seq_ids):
            del self.matchers[seq_id]

    def fill(self, matchers: list[tuple[llg.LLMatcher, list[int]]]) -> Future:
        """The bitmasks of these (matcher, drafts), filled on the mask thread: int32 [rows, ceil(vocab / 32)], a
        row for the matcher's next token, then one after each of its drafts (which the matcher allows)."""
        return self._masker.submit(self._fill, matchers)

    def _fill(self, matchers: list[tuple[llg.LLMatcher, list[int]]]) -> torch.Tensor:
        import llguidance as llg
        import llguidance.numpy as llg_numpy

        started = time.perf_counter()
        if self._llg_executor is None:
            self._llg_executor = llg.LLExecutor(num_threads=1)  # the cores belong to the forward
        rows, plain, drafted = 0, [], []
        for matcher, drafts in matchers:
            if drafts:
                drafted.append((matcher, rows, drafts))
            else:
                plain.append((matcher, rows))
            rows += 1 + len(drafts)
        bitmask = llg_numpy.allocate_token_bitmask(rows, self.vocab_size)
        if plain:
            llg_numpy.fill_next_token_bitmask_par(self._llg_executor, plain, bitmask)
        if drafted:  # each matcher consumes its drafts to fill their rows, and rolls back after
            llg_numpy.fill_next_token_bitmask_par_with_draft_tokens(self._llg_executor, drafted, bitmask)
        self.mask_seconds += time.perf_counter() - started
        self.masks_filled += rows
        return torch.from_numpy(bitmask)

    def stats(self) -> dict:
        return {"structured_compiled": self.compiled, "structured_cache_hits": self.cache_hits,
                "structured_refused": self.refused, "structured_compile_seconds": self.compile_seconds,
                "structured_cached": len(self.cache), "structured_matchers": len(self.matchers),
                "structured_mask_seconds": self.mask_seconds, "structured_masks": self.masks_filled}

    def close(self) -> None:
        self._compiler.shutdown(wait=False, cancel_futures=True)
        self._masker.shutdown(wait=True)
