"""Engine outputs as OpenAI objects: chat and text completions, whole or as stream chunks, with their logprobs.

Shapes follow OpenAI's API reference: `chat.completion` / `chat.completion.chunk` and `text_completion`, each
with `id`, `created`, `model`, `choices[i].index`, `finish_reason` and `usage`. A completions request with
several prompts numbers its choices prompt by prompt: choice `k * n + i` is sample i of prompt k.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvmux.outputs import Completion, RequestOutput
from kvmux.serve.tool_calls import CallSieve, ToolUse


@dataclass
class Call:
    """One HTTP generation request as the formatter needs it."""

    # chatcmpl-... or cmpl-...: the OpenAI object's id, and the request_id the engine knows it by (with a prompt's
    # index appended when a completions request has several prompts).
    response_id: str
    created: int  # unix seconds
    chat: bool
    n: int  # samples per prompt
    include_usage: bool = False
    tokens_as_ids: bool = False  # logprobs name each token "token_id:<id>" instead of by its text
    tools: ToolUse | None = None  # chat with tools: answers are read as tool calls where they are
    # Completions' logprobs carry each token's offset in its choice's text: where each choice has got to.
    offsets: dict[int, int] = field(default_factory=dict)


class Formatter:
    def __init__(self, tokenizer, model: str) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self._texts: dict[int, str] = {}  # token id -> its text alone, for logprobs

    def token_text(self, token_id: int, call: Call) -> str:
        if call.tokens_as_ids:
            return f"token_id:{token_id}"
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.detokenize([token_id])
        return text

    def _entry(self, call: Call, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id, call)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    def logprobs(self, call: Call, choice: int, token_ids: list[int], logprobs: list[float] | None,
                 top: list[list] | None) -> dict | None:
        """The `logprobs` object of a choice (or of one chunk of it); None when the request did not ask."""
        if logprobs is None:
            return None
        if call.chat:
            return {"content": [{**self._entry(call, t, lp), "top_logprobs": [self._entry(call, a, b) for a, b in alts]}
                                for t, lp, alts in zip(token_ids, logprobs, top)]}
        tokens = [self.token_text(t, call) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(call.offsets.get(choice, 0))
            call.offsets[choice] = offsets[-1] + len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
                "top_logprobs": [self._by_text(call, alts) for alts in top]}

    def _by_text(self, call: Call, alternatives: list) -> dict[str, float]:
        """The legacy format keys alternatives by text; where two tokens share one (a partial character, say)
        the likelier one keeps it."""
        by_text: dict[str, float] = {}
        for token_id, logprob in alternatives:
            by_text.setdefault(self.token_text(token_id, call), logprob)
        return by_text

    # -- whole answers ---------------------------------------------------------------

    def response(self, call: Call, completions: list[Completion]) -> dict:
        """The whole answer to a request whose every sample ended with stop or length."""
        choices = []
        for k, completion in enumerate(completions):
            for sample in completion.samples:
                index = k * call.n + sample.index
                logprobs = self.logprobs(call, index, sample.token_ids, sample.logprobs, sample.top_logprobs)
                choice = {"index": index, "logprobs": logprobs, "finish_reason": sample.finish_reason}
                if call.chat:
                    choice["message"], choice["finish_reason"] = message(call, sample.text, sample.finish_reason)
                else:
                    choice["text"] = sample.text
                choices.append(choice)
        prompt = sum(c.num_prompt_tokens for c in completions)
        return {**self._head(call), "choices": choices,
                "usage": usage(prompt, sum(s.num_output_tokens for c in completions for s in c.samples))}

    def _head(self, call: Call, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if call.chat else "text_completion"
        return {"id": call.response_id, "object": kind, "created": call.created, "model": self.model}

    # -- streams ---------------------------------------------------------------------------

    def _chunk(self, call: Call, choice: dict) -> str:
        chunk = {**self._head(call, chunk=True), "choices": [choice]}
        if call.include_usage:
            chunk["usage"] = None
        return json.dumps(chunk)

    async def events(self, call: Call, outputs: AsyncIterator[tuple[int, RequestOutput]],
                     refusal) -> AsyncIterator[str]:
        """The `data:` events of a streamed answer: chunks, then a usage chunk if asked, then [DONE].

        outputs yields (prompt number, output) pairs. A sample that ends with abort or error ends the stream
        with an error event (OpenAI's SDKs raise it), built by refusal(finish_reason, message).
        """
        if call.chat:
            for index in range(call.n):
                yield self._chunk(call, {"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None})
        prompts, completion_tokens = {}, {}
        sieves = {}  # with tools: each choice's text that may be a call, held back
        async for k, out in outputs:
            if out.finish_reason in ("abort", "error"):
                yield json.dumps(refusal(out.finish_reason, out.error))
                return
            index = k * call.n + out.index
            prompts[k] = out.num_prompt_tokens
            completion_tokens[index] = out.num_output_tokens
            text = out.text
            if call.tools is not None:
                text = sieves.setdefault(index, CallSieve(call.tools)).feed(text)
            # Tokens whose text is still held back (half a character, perhaps a stop string, perhaps a tool call)
            # wait, unless each token's logprobs must go out with it.
            sends = bool(text or (out.token_ids and out.logprobs is not None))
            if sends:
                logprobs = self.logprobs(call, index, out.token_ids, out.logprobs, out.top_logprobs)
                body = {"delta": {"content": text}} if call.chat else {"text": text}
                last = out.finished and not call.chat  # chat sends its finish reason in a chunk of its own
                yield self._chunk(call, {"index": index, **body, "logprobs": logprobs,
                                         "finish_reason": out.finish_reason if last else None})
            if out.finished and call.chat:
                for choice in self._chat_ending(index, out.finish_reason, sieves.get(index)):
                    yield self._chunk(call, choice)
            elif out.finished and not sends:
                yield self._chunk(call, {"index": index, "text": "", "logprobs": None,
                                         "finish_reason": out.finish_reason})
        if call.include_usage:
            yield json.dumps({**self._head(call, chunk=True), "choices": [],
                              "usage": usage(sum(prompts.values()), sum(completion_tokens.values()))})
        yield "[DONE]"

    @staticmethod
    def _chat_ending(index: int, finish_reason: str, sieve: CallSieve | None) -> list[dict]:
        """A streamed chat choice's last chunks: what its sieve held, as content or as tool-call deltas (OpenAI's:
        each call's id, type and name first, then its arguments), then the finish reason."""
        held, calls = sieve.finish(finish_reason == "stop") if sieve else ("", None)
        deltas = [{"content": held}] if held else []
        for k, tool_call in enumerate(calls or []):
            function = tool_call["function"]
            deltas.append({"tool_calls": [{"index": k, "id": tool_call["id"], "type": "function",
                                           "function": {"name": function["name"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": function["arguments"]}}]})
        deltas.append({})
        last = "tool_calls" if calls else finish_reason
        return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None if delta else last}
                for delta in deltas]


def message(call: Call, text: str, finish_reason: str) -> tuple[dict, str]:
    """A whole chat choice's message and finish reason: its tool calls, if it is calls of the request's tools
    (only an answer that ended by itself can be)."""
    parsed = call.tools.parse(text) if call.tools is not None and finish_reason == "stop" else None
    if parsed is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, tool_calls = parsed
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}, "tool_calls"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
