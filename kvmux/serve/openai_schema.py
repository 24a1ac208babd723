"""The OpenAI-compatible HTTP API's bodies as pydantic models: what a request may hold, what a response holds.

Requests check types and shapes only (strictly: "10" is not a number, 1 is not true); unknown fields are
ignored, as OpenAI's API ignores them. Ranges are the engine's to check (SamplingParams.validate, admission),
so every interface refuses the same values with the same words. Responses are built as plain dicts for
speed; their models here document them in the OpenAPI schema (the fuzz test checks answers against it).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmux.sampling import SamplingParams, StructuredOutputs

MAX_PROMPTS = 64  # prompts in one completions request (times n: the choices of one request)


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


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        """The message as the chat template takes it: text content, developer read as system."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


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
    tools: list[dict] | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise FieldError("tools", "tools (function calling) are not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")

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
    add_special_tokens: bool | None = True


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
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


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
