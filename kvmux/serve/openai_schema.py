"""The OpenAI-compatible HTTP API's bodies as pydantic models: what a request may hold, what a response holds.

Requests check types and shapes only (strictly: "10" is not a number, 1 is not true); unknown fields are
ignored, as OpenAI's API ignores them. Ranges are the engine's to check (SamplingParams.validate, admission),
so every interface refuses the same values with the same words. Responses are built as plain dicts for
speed; their models here document them in the OpenAPI schema (the fuzz test checks answers against it).
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmux.sampling import SamplingParams, StructuredOutputs

MAX_PROMPTS = 64  # prompts in one completions request (times n: the choices of one request)
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_CHOICES = ("none", "auto", "required")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class FieldError(ValueError):
    """A field whose value kvmux cannot serve: one OpenAI defines that kvmux does not implement, or a shape
    pydantic's types cannot express (an empty prompt list)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# -- requests ----------------------------------------------------------------------

class TextPart(_Body):
    type: Literal["text"]
    text: str


class CalledFunction(_Body):
    name: str
    arguments: str  # the arguments as a JSON object's text


class ToolCall(_Body):
    """A call an assistant made: in an answer's message, and in the history a request sends back."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (its content may then be null)
    tool_call_id: str | None = None  # a tool message: the call whose result it holds

    def for_template(self) -> dict:
        """The message as the chat template takes it: text content, developer read as system, and its calls
        or the call it answers in OpenAI's shapes (kvmux.serve.tool_calls rewrites them for the model)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of type object; none: the function takes no arguments
    strict: bool | None = None  # accepted: a required call's arguments always follow parameters


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


def check_messages(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        if message.tool_calls and message.role != "assistant":
            raise FieldError(f"messages.{i}.tool_calls", f"only assistant messages carry tool_calls, not "
                                                         f"{message.role} messages")
        if message.role == "tool" and message.tool_call_id is None:
            raise FieldError(f"messages.{i}.tool_call_id", "a tool message needs the tool_call_id of the call "
                                                           "whose result it holds")


def check_tools(tools: list[ToolDefinition]) -> None:
    seen = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not TOOL_NAME.fullmatch(name):
            raise FieldError(f"tools.{i}.function.name", f"a function name is 1 to 64 letters, digits, _ and -; "
                                                         f"{name!r} is not")
        if name in seen:
            raise FieldError(f"tools.{i}.function.name", f"two tools are named {name!r}: names must be unique")
        seen.add(name)
        parameters = tool.function.parameters
        if parameters is not None and parameters.get("type", "object") != "object":
            raise FieldError(f"tools.{i}.function.parameters", "parameters must be a JSON schema of type object")


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Generation(_Body):
    """What chat and completions requests share: the sampling fields and the vLLM extensions."""

    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 (vLLM's "off") is read as 0
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions. priority: lower is scheduled first, as in vLLM (the engine's priority is its negation).
    priority: int | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None
    return_tokens_as_token_ids: bool | None = False  # logprobs name tokens "token_id:<id>", exactly
    # Structured outputs: vLLM's extra body (json, json_object, regex, choice, grammar), and llama.cpp's server
    # fields (grammar: GBNF or Lark; json_schema: a schema).
    structured_outputs: dict | None = None
    grammar: str | None = None
    json_schema: dict | None = None

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        defaults = SamplingParams()
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=max_tokens, n=1 if self.n is None else self.n,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else 0 if self.top_k == -1 else self.top_k,
            min_p=self.min_p or 0.0, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, stop=stop,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=bool(self.ignore_eos), logprobs=logprobs,
            structured_outputs=self.constraint())

    def constraints(self) -> dict[str, StructuredOutputs]:
        """The constraints the body asks for, by the field that asks (at most one may)."""
        found = {}
        if self.structured_outputs is not None:
            try:
                found["structured_outputs"] = StructuredOutputs.from_map(self.structured_outputs)
            except ValueError as exc:
                raise FieldError("structured_outputs", str(exc)) from None
        if self.grammar is not None:
            found["grammar"] = StructuredOutputs(grammar=self.grammar)
        if self.json_schema is not None:
            found["json_schema"] = StructuredOutputs(json=self.json_schema)
        return found

    def constraint(self) -> StructuredOutputs | None:
        found = self.constraints()
        if len(found) > 1:
            raise FieldError(sorted(found)[1], f"ask for one constraint, not several ({', '.join(sorted(found))})")
        return next(iter(found.values()), None)

    def check_supported(self) -> None:
        if self.logit_bias:
            raise FieldError("logit_bias", "logit_bias is not supported by this server")
        self.constraint()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: str | NamedToolChoice | None = None  # "none", "auto" (the default with tools), "required"
    parallel_tool_calls: bool | None = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        check_messages(self.messages)
        check_tools(self.tools or [])
        self._check_tool_choice()

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in TOOL_CHOICES:
            raise FieldError("tool_choice", f'tool_choice must be "none", "auto", "required" or {{"type": '
                                            f'"function", "function": {{"name": ...}}}}, not {choice!r}')
        mode, only = self.tool_mode()
        names = {tool.function.name for tool in self.tools or []}
        if only is not None and only not in names:
            raise FieldError("tool_choice", f"tool_choice names the function {only!r}, which is not among the tools")
        if mode == "required" and not names:
            raise FieldError("tool_choice", 'tool_choice "required" needs tools, and the request has none')
        constrained = sorted(self.constraints()) if mode == "required" else []
        if constrained:
            raise FieldError(constrained[0], f"{constrained[0]} cannot be combined with a required tool call "
                                             f"(tool_choice {'naming a function' if only else repr(mode)}): the "
                                             f"call's grammar is the output's constraint")

    def tool_mode(self) -> tuple[str, str | None]:
        """("none", "auto" or "required", the one function a named tool_choice calls or None)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "required", self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none"), None

    def constraints(self) -> dict[str, StructuredOutputs]:
        found = super().constraints()
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            found["response_format"] = StructuredOutputs(json_object=True)
        elif kind == "json_schema":
            spec = self.response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise FieldError("response_format", "response_format json_schema needs {\"json_schema\": {\"name\": "
                                                    "..., \"schema\": {...}}} with the schema an object")
            found["response_format"] = StructuredOutputs(json=schema)
        elif kind != "text":
            raise FieldError("response_format", f"response_format type must be text, json_object or json_schema, "
                                                f"not {kind!r}")
        return found

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise FieldError("echo", "echo is not supported by this server")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported by this server")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise FieldError("best_of", "best_of other than n is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise FieldError("prompt", "prompt must not be an empty list")
        if len(self.prompts()) * (self.n or 1) > MAX_PROMPTS:
            raise FieldError("prompt", f"prompts x n must be at most {MAX_PROMPTS}")

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string or token list each."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def sampling_params(self) -> SamplingParams:
        return self.sampling(self.max_tokens, self.logprobs)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None  # with messages: shown to the model as a chat request shows them
    add_special_tokens: bool | None = True

    def check_supported(self) -> None:
        check_messages(self.messages or [])
        check_tools(self.tools or [])


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# -- responses (documentation and the fuzz test's oracle) ----------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # null when the answer is tool calls alone
    tool_calls: list[ToolCall] | None = None  # present when the answer calls tools (finish_reason "tool_calls")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "shutting_down"]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo
