"""Admission: validates and tokenizes requests, compiles their structured-output constraints, enforces limits,
applies backpressure, routes aborts."""
from __future__ import annotations

import asyncio
import itertools
import random
from array import array
from dataclasses import dataclass, replace

from kvmux.engine import messages
from kvmux.engine.actor import Actor
from kvmux.engine.constraints import ConstraintError, Constraints
from kvmux.engine.detokenize import initial_offsets

MAX_CACHE_SALT = 256  # characters of a request's cache salt


@dataclass
class Limits:
    max_model_len: int
    pool_tokens: int  # every block of the KV pool, in tokens
    block_size: int
    max_pending: int  # requests admitted and not yet finished
    vocab_size: int
    max_prompt_tokens: int | None = None  # an operator's cap, below what the context allows
    max_tokens_limit: int | None = None
    # With a sliding-window pool every sample holds a seat of its own (its window): n beyond the seats never fits.
    max_samples: int | None = None


class Admission(Actor):
    name = "admission"

    def __init__(self, tokenizer, limits: Limits, prefill: Actor, decode: Actor, router: Actor,
                 constraints: Constraints) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.constraints = constraints
        self.constraint_keys: dict[str, str] = {}  # request id -> the compiled constraint it holds
        self.compiling: set[asyncio.Task] = set()
        self.limits = limits
        self.prefill = prefill
        self.decode = decode
        self.router = router
        self.live: dict[str, int] = {}  # request id -> serial of the admitted, unfinished request of that id
        self.serials = itertools.count()
        self.admitted = 0
        self.rejected = 0

    async def handle(self, message) -> None:
        if isinstance(message, messages.Submit):
            self._submit(message)
        elif isinstance(message, messages.Abort):
            # The request is with prefill or with decode, or moving between them;
            # both hear of it, and whichever holds it (now or later) ends it.
            serial = self.live.get(message.request_id)
            if serial is not None:
                abort = messages.Abort(message.request_id, serial, message.error)
                self.prefill.send(abort)
                self.decode.send(abort)
        elif isinstance(message, messages.Finished):
            for request_id in message.request_ids:
                self.live.pop(request_id, None)
                key = self.constraint_keys.pop(request_id, None)
                if key is not None:
                    self.constraints.release(key)
        elif isinstance(message, messages.StatsQuery):
            self.router.send(messages.StatsReply(message.query_id, self.name, {
                "requests_admitted": self.admitted, "requests_rejected": self.rejected, "requests_live": len(self.live),
            }))

    def on_error(self, message, exc: Exception) -> None:
        if isinstance(message, messages.Submit):
            self._reject(message.request_id, "internal_error", f"{type(exc).__name__}: {exc}")

    def _reject(self, request_id: str, code: str, text: str) -> None:
        self.rejected += 1
        self.router.send(messages.Rejected(request_id, code, text))

    def _submit(self, sub: messages.Submit) -> None:
        if sub.request_id in self.live:
            return self._reject(sub.request_id, "duplicate_request_id", f"request id {sub.request_id!r} is already in flight")
        if len(self.live) >= self.limits.max_pending:
            return self._reject(sub.request_id, "overloaded",
                                f"{len(self.live)} requests in flight, the limit is {self.limits.max_pending}; retry later")
        try:
            sub.params.validate()
        except ValueError as exc:
            return self._reject(sub.request_id, "invalid_params", str(exc))
        salt = sub.cache_salt
        if salt is not None and not (isinstance(salt, str) and 0 < len(salt) <= MAX_CACHE_SALT):
            return self._reject(sub.request_id, "invalid_params",
                                f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters")
        most = self.limits.max_samples
        if most is not None and sub.params.n > most:
            return self._reject(sub.request_id, "invalid_params",
                                f"n ({sub.params.n}) exceeds max_num_seqs ({most}): with this model's sliding-window "
                                f"pool each sample takes a seat; ask for fewer or raise --max-num-seqs")
        cap = self.limits.max_tokens_limit
        if cap is not None and sub.params.max_tokens is not None and sub.params.max_tokens > cap:
            return self._reject(sub.request_id, "invalid_params",
                                f"max_tokens ({sub.params.max_tokens}) exceeds this engine's limit of {cap}")
        try:
            prompt_ids = self._tokenize(sub)
        except ValueError as exc:
            return self._reject(sub.request_id, "invalid_prompt", str(exc))
        if sub.params.max_tokens is None:
            sub.params.max_tokens = self._room(len(prompt_ids))
        problem = self._too_long(len(prompt_ids), sub.params.max_tokens)
        if problem:
            return self._reject(sub.request_id, "prompt_too_long", problem)
        seed = sub.params.seed if sub.params.seed is not None else random.getrandbits(63)
        prefix_offset, read_offset = initial_offsets(len(prompt_ids))
        serial = self.live[sub.request_id] = next(self.serials)
        self.admitted += 1
        # The one copy the request keeps for its life (validate bounded it): stop ids as 4-byte ints.
        params = replace(sub.params, stop_token_ids=array("i", sub.params.stop_token_ids))
        seq = messages.SeqState(
            request_id=sub.request_id, serial=serial, token_ids=prompt_ids, num_prompt_tokens=len(prompt_ids), params=params,
            seed=seed, arrival=sub.arrival, priority=sub.priority,
            prefix_offset=prefix_offset, read_offset=read_offset, cache_salt=salt,
        )
        if params.structured_outputs is None:
            self.prefill.send(messages.Admitted(seq))
            return None
        # Compiling takes a thread and may take a while: admission goes on with other requests meanwhile. An abort
        # that arrives first reaches prefill and decode by serial as usual, and ends the request when it comes.
        task = asyncio.create_task(self._compile_then_admit(seq))
        self.compiling.add(task)
        task.add_done_callback(self.compiling.discard)
        return None

    async def _compile_then_admit(self, seq: messages.SeqState) -> None:
        try:
            key = await self.constraints.compile(seq.params.structured_outputs)
        except ConstraintError as exc:
            self.live.pop(seq.request_id, None)
            self.admitted -= 1
            return self._reject(seq.request_id, "invalid_params", str(exc))
        except Exception as exc:  # noqa: BLE001 - a broken compile refuses its request, not the engine
            self.live.pop(seq.request_id, None)
            self.admitted -= 1
            return self._reject(seq.request_id, "internal_error", f"compiling structured_outputs failed: {exc!r}")
        self.constraint_keys[seq.request_id] = seq.constraint = key
        self.prefill.send(messages.Admitted(seq))
        return None

    def _tokenize(self, sub: messages.Submit) -> list[int]:
        if sub.chat is not None:
            if not self.tokenizer.chat_template:
                raise ValueError("this model has no chat template, so chat messages cannot be formatted; send the "
                                 "prompt as raw text instead (`--raw` on the command line, a string in Python)")
            try:
                text = self.tokenizer.apply_chat_template(sub.chat, tools=sub.tools)
            except Exception as exc:  # noqa: BLE001 - a template raises what it likes (jinja's TemplateError, ...)
                raise ValueError(f"the model's chat template refused the messages: {exc}") from None
            ids = self.tokenizer.tokenize(text, add_special_tokens=False)
        elif sub.prompt is not None:
            ids = self.tokenizer.tokenize(sub.prompt)
        else:
            ids = sub.prompt_ids or []
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.limits.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad!r} is not in the vocabulary [0, {self.limits.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        return list(ids)

    def _room(self, prompt_len: int) -> int:
        """max_tokens for a request that left it open: what the context and the pool leave after the prompt
        (at least 1, so that a prompt leaving no room is refused as too long)."""
        room = min(self.limits.max_model_len, self.limits.pool_tokens) - prompt_len
        return max(1, min(room, self.limits.max_tokens_limit or room))

    def _too_long(self, prompt_len: int, max_tokens: int) -> str | None:
        cap = self.limits.max_prompt_tokens
        if cap is not None and prompt_len > cap:
            return f"prompt ({prompt_len} tokens) exceeds this engine's limit of {cap} prompt tokens"
        total = prompt_len + max_tokens
        if total > self.limits.max_model_len:
            return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's "
                    f"context length of {self.limits.max_model_len} tokens")
        if total > self.limits.pool_tokens:
            return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} can never fit in the KV pool "
                    f"of {self.limits.pool_tokens} tokens; raise num_blocks or lower max_tokens")
        return None
