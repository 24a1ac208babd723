"""Tool calling: the served model family's call format.

A format says how the model writes calls, so kvmux can show it its past calls, constrain it to make one
(a Lark grammar for llguidance, each tool's parameters an inline JSON schema) and read calls back from its
answers. It is chosen from the chat template's text (`detect`):

- hermes (Qwen 2.5 / 3, Hermes; `<tool_call>` in the template): text, then each call as
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`;
- llama3 (`<|python_tag|>` or `ipython`): `{"name": ..., "parameters": {...}}`, several joined by "; ";
- mistral (`[TOOL_CALLS]`): a JSON list of `{"name": ..., "arguments": {...}}`;
- generic (any other template, SmolLM2's among them): kvmux describes the tools in a system message and the
  model answers `{"tool_calls": [{"name": ..., "arguments": {...}}]}`.

Llama 3 and Mistral open their calls with a special token (`<|python_tag|>`, `[TOOL_CALLS]`), which output
text drops like every special token: calls are read with or without it, and grammars write them without it.
A call that does not parse, or names no tool of the request, leaves the answer plain text.
"""
from __future__ import annotations

import functools
import json
import re
import secrets
import string
from dataclasses import dataclass

_ALPHANUMERICS = string.ascii_letters + string.digits
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")
# Arguments are written as json.dumps writes them, which is how kvmux writes past calls into the history.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A function without parameters takes none (OpenAI's reading), so its call's arguments are {}.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALPHANUMERICS) for _ in range(24))


@functools.cache
def _pattern(literal: str) -> re.Pattern:
    """The literal, allowing any whitespace around its JSON punctuation and where it has some: a model that
    calls a tool unconstrained spaces its calls as it likes."""
    parts = re.findall(r"[{}\[\]:,;]|[^\s{}\[\]:,;]+", literal)
    return re.compile("".join(r"\s*" + re.escape(part) for part in parts))


@dataclass(frozen=True)
class CallFormat:
    """How a model family writes its calls: opener, the calls (JSON objects) joined by separator, closer."""

    name: str
    native: bool  # the chat template renders tools and past calls itself (else kvmux writes them as text)
    opener: str  # the text before the first call
    separator: str  # between two calls
    closer: str  # after the last call
    markers: tuple[str, ...]  # what a call starts with
    anywhere: bool = False  # calls may follow text; else a call is the whole answer
    arguments_key: str = "arguments"
    special: str = ""  # the special token the model writes before its calls (output text drops it)
    id_chars: int | None = None  # the template takes call ids of exactly this length: it gets their last ones

    def text(self, calls: list[tuple[str, object]]) -> str:
        """(name, arguments) calls as the model writes them."""
        return self.opener + self.separator.join(
            json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
            for name, arguments in calls) + self.closer

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """A Lark grammar for one call of one of the tools (OpenAI function definitions), or with parallel
        one or more; each alternative writes its tool's name, so the name decides the arguments' schema."""
        more = f"({json.dumps(self.separator)} call)*" if parallel else ""
        start = [json.dumps(self.opener) if self.opener else "", "call", more,
                 json.dumps(self.closer) if self.closer else ""]
        rules = ["start: " + " ".join(part for part in start if part),
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            function = tool["function"]
            head = f'{{"name": {json.dumps(function["name"])}, "{self.arguments_key}": '
            schema = {**(function.get("parameters") or NO_PARAMETERS), "x-guidance": _JSON_STYLE}
            rules += [f'call_{i}: {json.dumps(head)} arguments_{i} "}}"',
                      f"arguments_{i}: %json {json.dumps(schema)}"]
        return "\n".join(rules) + "\n"

    def parse(self, text: str, names: frozenset[str]) -> tuple[str | None, list[dict]] | None:
        """(the text before the calls or None, OpenAI tool calls) if the answer is calls of these tools."""
        start = self._start(text, 0)
        if start is None:
            return None
        objects = self._objects(text[start:].removeprefix(self.special))
        calls = [self._call(obj, names) for obj in objects or []]
        if not calls or None in calls:
            return None
        return text[:start].rstrip() or None, calls

    def held_from(self, text: str, since: int = 0) -> int:
        """Where in a streamed answer a call may have begun: the text from there is held back (len(text): none
        is). The text before `since` is known to hold no call."""
        if not self.anywhere:
            body = _SPACE.match(text).end()
            head = text[body:body + max(map(len, self.markers))]
            return 0 if any(m.startswith(head) or head.startswith(m) for m in self.markers) else len(text)
        start = self._start(text, since)
        if start is None:  # the end may be the first characters of a marker
            start = next((i for i in range(max(since, len(text) - max(map(len, self.markers))), len(text))
                          if any(m.startswith(text[i:]) for m in self.markers)), len(text))
        while start > since and text[start - 1].isspace():  # the text before a call is sent without its spacing
            start -= 1
        return start

    def _start(self, text: str, since: int) -> int | None:
        if self.anywhere:
            return min((i for i in (text.find(m, since) for m in self.markers) if i >= 0), default=None)
        body = _SPACE.match(text).end()
        return body if text.startswith(self.markers, body) else None

    def _objects(self, body: str) -> list | None:
        """The JSON values between opener, separators and closer; None if the body is anything else."""
        match = _pattern(self.opener).match(body)
        if match is None:
            return None
        objects, end = [], match.end()
        while True:
            try:
                value, end = _DECODER.raw_decode(body, _SPACE.match(body, end).end())
            except (ValueError, RecursionError):  # not JSON; JSON nested deeper than Python parses
                return None
            objects.append(value)
            match = _pattern(self.separator).match(body, end)
            if match is None:
                break
            end = match.end()
        match = _pattern(self.closer).match(body, end)  # a model may stop before closing: that still is a call
        return objects if not body[match.end() if match else end:].strip() else None

    def _call(self, value, names: frozenset[str]) -> dict | None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in names:
            return None
        arguments = next((value[k] for k in (self.arguments_key, "arguments", "parameters") if k in value), {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        return {"id": call_id(), "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


HERMES = CallFormat("hermes", True, "<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>",
                    ("<tool_call>",), anywhere=True)
LLAMA3 = CallFormat("llama3", True, "", "; ", "", ("<|python_tag|>", "{"), arguments_key="parameters",
                    special="<|python_tag|>")
MISTRAL = CallFormat("mistral", True, "[", ", ", "]", ("[TOOL_CALLS]", "["), special="[TOOL_CALLS]", id_chars=9)
GENERIC = CallFormat("generic", False, '{"tool_calls": [', ", ", "]}", ("{",))


def detect(chat_template: str | None) -> CallFormat:
    template = chat_template or ""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return GENERIC


@dataclass(frozen=True)
class ToolUse:
    """How one request's answers are read: as calls of its tools, in the model's format."""

    format: CallFormat
    names: frozenset[str]

    def parse(self, text: str) -> tuple[str | None, list[dict]] | None:
        return self.format.parse(text, self.names)


class CallSieve:
    """One streamed answer under tools: what may go out as content now. Text that may be a call is held back
    until the answer ends, so that a call is never streamed as content."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> str:
        self.text += piece
        end = max(self.sent, self.use.format.held_from(self.text, self.sent))
        released, self.sent = self.text[self.sent:end], end
        return released

    def finish(self, complete: bool) -> tuple[str, list[dict] | None]:
        """(the held text, None), or ("", the calls) when the answer, complete (it ended by itself), is calls."""
        parsed = self.use.parse(self.text) if complete else None
        return ("", parsed[1]) if parsed else (self.text[self.sent:], None)


@dataclass
class ChatPrompt:
    messages: list[dict]  # as the chat template takes them
    tools: list[dict] | None  # handed to the chat template (native formats)
    grammar: str | None  # the constraint that makes the model call a tool
    use: ToolUse | None  # None: answers are plain text


class ChatTools:
    """The served model's tool calling: its format, and how its chat template takes tools and past calls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.format = detect(tokenizer.chat_template)

    def prepare(self, messages: list[dict], tools: list[dict], choice: str = "none", only: str | None = None,
                parallel: bool = True) -> ChatPrompt:
        """The conversation for the template. choice is "none" (the tools are not shown: the model cannot
        call them), "auto" (it may) or "required" (it must, by a grammar; only: the one tool it calls, once)."""
        history = self._history(messages)
        if choice == "none" or not tools:
            return ChatPrompt(history, None, None, None)
        use = ToolUse(self.format, frozenset(t["function"]["name"] for t in tools))
        grammar = None
        if choice == "required":
            called = [t for t in tools if only is None or t["function"]["name"] == only]
            grammar = self.format.grammar(called, parallel and only is None)
        if self.format.native:
            return ChatPrompt(history, tools, grammar, use)
        return ChatPrompt(self._with_system(history, self._describe(tools, choice, only)), None, grammar, use)

    # -- the history -------------------------------------------------------------------

    def _history(self, messages: list[dict]) -> list[dict]:
        names = {}  # call id -> its function's name, for tool results written as text
        history = []
        for message in messages:
            if message.get("tool_calls"):
                names.update((c["id"], c["function"]["name"]) for c in message["tool_calls"])
                history.append(self._calls_message(message))
            elif message["role"] == "tool":
                history.append(self._result_message(message, names.get(message.get("tool_call_id"))))
            else:
                history.append(message)
        return history

    def _calls_message(self, message: dict) -> dict:
        calls = [(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in message["tool_calls"]]
        if not self.format.native:
            text = self.format.text(calls)
            return {"role": "assistant", "content": f"{message['content']}\n{text}" if message["content"] else text}
        return {**message, "tool_calls": [{"id": self._id(c["id"]), "type": "function",
                                          "function": {"name": name, "arguments": arguments}}
                                         for c, (name, arguments) in zip(message["tool_calls"], calls)]}

    def _result_message(self, message: dict, name: str | None) -> dict:
        if self.format.native:
            return {**message, "tool_call_id": self._id(message["tool_call_id"]), "name": name}
        if self.renders_tool_role:
            return {"role": "tool", "content": message["content"]}
        return {"role": "user", "content": f"Result of the tool {name or 'call'}: {message['content']}"}

    def _id(self, call: str) -> str:
        return call[-self.format.id_chars:] if self.format.id_chars else call

    # -- the generic format's system message -------------------------------------------

    def _describe(self, tools: list[dict], choice: str, only: str | None) -> str:
        lines = ["You can call these tools (functions), each described in JSON:"]
        lines += [json.dumps(t["function"], ensure_ascii=False) for t in tools]
        example = f'{self.format.opener}{{"name": "<tool name>", "arguments": {{<its arguments>}}}}{self.format.closer}'
        lines.append(f"To call tools, answer with only this JSON and nothing else, one entry per call: {example}")
        if only:
            lines.append(f"You must call the tool {only}.")
        elif choice == "required":
            lines.append("You must call at least one tool.")
        else:
            lines.append("If no tool helps, answer in plain text instead.")
        return "\n".join(lines)

    def _with_system(self, history: list[dict], description: str) -> list[dict]:
        """The tools' description in the system message: merged into the conversation's own, or a new one
        first (where the template renders no system message, at the head of the first message)."""
        if history and history[0]["role"] == "system":
            return [{**history[0], "content": f"{history[0]['content']}\n\n{description}"}, *history[1:]]
        if self.renders_system_role or not history:
            return [{"role": "system", "content": description}, *history]
        return [{**history[0], "content": f"{description}\n\n{history[0]['content']}"}, *history[1:]]

    @functools.cached_property
    def renders_system_role(self) -> bool:
        return self._renders([{"role": "system", "content": _PROBE}, {"role": "user", "content": "Hi"}])

    @functools.cached_property
    def renders_tool_role(self) -> bool:
        return self._renders([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              {"role": "tool", "content": _PROBE}])

    def _renders(self, messages: list[dict]) -> bool:
        """Whether the template renders the probe's text (a template may raise on a role it does not take)."""
        try:
            return _PROBE in self.tokenizer.apply_chat_template(messages)
        except Exception:  # noqa: BLE001 - a template raises what it likes
            return False


_PROBE = "kvmux-probe-7f3a"


def _arguments(text: str):
    """A past call's arguments as templates take them: the object its JSON text holds (else the text)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text
