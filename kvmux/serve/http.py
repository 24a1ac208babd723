"""The OpenAI-compatible HTTP server: FastAPI routes on uvicorn, in the engine's own event loop.

One engine serves both this and the Unix socket (kvmux/serve/server.py) from one process. docs/http.md
describes the API; what a hostile client can and cannot do is bounded as on the socket: a request's body
(size, time to arrive), how long an answer may stay unread, unfinished requests overall (429 from the
engine's max_pending), connections (uvicorn's limit), and shutdown, which drains within a grace period.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from kvmux.engine.supervisor import Engine
from kvmux.outputs import Completion, KvmuxError, RequestOutput
from kvmux.sampling import SamplingParams, StructuredOutputs
from kvmux.serve import openai_schema as schema
from kvmux.serve.http_asgi import EventStream, body_limits, disconnected
from kvmux.serve.http_openai import Call, Formatter
from kvmux.serve.metrics import CONTENT_TYPE, Metrics
from kvmux.serve.tool_calls import ChatPrompt, ChatTools

log = logging.getLogger("kvmux.serve.http")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "invalid_request_error", 500: "server_error", 503: "server_error"}
# The engine's refusal codes (kvmux.outputs.KvmuxError.code) as HTTP statuses.
STATUS_OF_CODE = {"invalid_params": 400, "invalid_prompt": 400, "prompt_too_long": 400, "duplicate_request_id": 400,
                  "overloaded": 429, "not_running": 503, "engine_dead": 500, "internal_error": 500}
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize"}
SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__) | {"cache_salt"}


@dataclass
class HttpOptions:
    host: str = "127.0.0.1"  # loopback: reaching it from elsewhere is a deliberate choice
    port: int = 8000  # 0: any free port (HttpServer.port says which)
    api_key: str | None = None  # requests to /v1/*, /tokenize and /detokenize need `Authorization: Bearer <key>`
    served_model_name: str | None = None  # None: the model's folder or file stem
    max_body_bytes: int = 1 << 20
    read_timeout: float = 10.0  # seconds a request's body may take to arrive
    write_timeout: float = 60.0  # seconds one streamed event may wait for the client to read
    grace_period: float = 10.0  # seconds in-flight requests get to finish on shutdown before they are aborted
    max_connections: int = 1024  # connections (and requests) at once; past it uvicorn answers 503


class ApiError(Exception):
    """An answer with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def error_body(status: int, code: str | None, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(error_body(exc.status, exc.code, exc.message, exc.param), exc.status, headers=headers)


def refused(exc: KvmuxError, chat: bool) -> ApiError:
    """An engine refusal as an API error, naming the field it is about where the message does."""
    status = STATUS_OF_CODE.get(exc.code, 500)
    param = None
    if exc.code in ("invalid_prompt", "prompt_too_long"):
        param = "messages" if chat else "prompt"
    elif exc.code == "invalid_params":
        first = exc.message.split(" ", 1)[0]
        param = ("top_logprobs" if chat and first == "logprobs" else first) if first in SAMPLING_FIELDS else None
    return ApiError(status, exc.code, exc.message, param)


def tools_refused(exc: KvmuxError) -> ApiError:
    """A refusal of a request whose constraint is its tools' grammar: a constraint that does not compile is one
    of the functions' parameters."""
    if exc.code == "invalid_params" and exc.message.startswith("structured_outputs"):
        return ApiError(400, exc.code, f"the tools' parameters cannot be enforced: {exc.message}", "tools")
    return refused(exc, True)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening: a taken port fails here, before the model loads."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the kvmux command handles SIGINT/SIGTERM for the socket and HTTP servers together


async def _after(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for out in stream:
        yield out


async def _merged(firsts: list[RequestOutput], streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt number, output) from several streams as they come; each stream's first output is given."""
    if len(streams) == 1:
        async for out in _after(firsts[0], streams[0]):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int) -> None:
        try:
            async for out in _after(firsts[k], streams[k]):
                queue.put_nowait((k, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((k, exc))
        queue.put_nowait((k, None))

    pumps = [asyncio.ensure_future(pump(k)) for k in range(len(streams))]
    try:
        left = len(streams)
        while left:
            k, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                left -= 1
            else:
                yield k, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _close(streams: list) -> None:
    for stream in streams:
        await stream.aclose()  # aborts a request still running


class HttpServer:
    """Serves an Engine over HTTP with OpenAI's API.

        server = HttpServer(engine, HttpOptions(port=8000))
        await server.start()
        ...
        await server.shutdown()
    """

    def __init__(self, engine: Engine, options: HttpOptions, sock: socket.socket | None = None) -> None:
        self.engine = engine
        self.options = options
        self.model = options.served_model_name or engine.loaded.name
        self.formatter = Formatter(engine.tokenizer, self.model)
        self.chat_tools = ChatTools(engine.tokenizer)
        spec = engine.config.speculative_config
        self.metrics = Metrics(engine.geometry.block_bytes, ROUTES, spec["method"] if spec else None)
        self.closing = False
        self.active: set[str] = set()  # the request_ids of the generations in flight
        self.created = int(time.time())
        self.app = self._build_app()
        self._sock = sock
        self._uvicorn: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        self.port = options.port

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        sock = self._sock or listen(self.options.host, self.options.port)
        self.port = sock.getsockname()[1]
        asgi = self.metrics.count_statuses(body_limits(self.app, self.options.max_body_bytes,
                                                       self.options.read_timeout, self._body_refused))
        config = uvicorn.Config(asgi, loop="none", lifespan="off", log_config=None, log_level="warning",
                                access_log=False, ws="none", server_header=False,
                                limit_concurrency=self.options.max_connections,
                                timeout_graceful_shutdown=int(self.options.grace_period) + 10)
        self._uvicorn = _Uvicorn(config)
        self.engine.request_listeners.append(self.metrics.observe)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]), name="kvmux-http")
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    def _body_refused(self, status: int) -> dict:
        if status == 408:
            return error_body(408, "request_timeout",
                              f"the request body did not arrive within {self.options.read_timeout:g} s")
        return error_body(413, "body_too_large", f"the request body exceeds {self.options.max_body_bytes} bytes")

    def in_flight(self) -> int:
        return len(self.active)

    async def shutdown(self) -> None:
        """Stop accepting, answer new requests with 503, let in-flight ones finish within the grace period, abort
        the rest (a stream ends with an error event, a whole answer is 503), and close."""
        if self._task is None:
            return
        self.closing = True
        self._uvicorn.should_exit = True  # closes the listener and idle connections; busy ones close after answering
        deadline = time.monotonic() + self.options.grace_period
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self.active):
            await self.engine.abort(request_id)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=15)
        except asyncio.TimeoutError:
            self._uvicorn.force_exit = True
            log.error("the HTTP server did not stop within 15 s of the grace period")
        with contextlib.suppress(ValueError):
            self.engine.request_listeners.remove(self.metrics.observe)
        self._task = None

    # -- the app ---------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="kvmux", version="0.1.0", docs_url=None, redoc_url=None, exception_handlers={
            ApiError: lambda request, exc: error_response(exc),
            RequestValidationError: self._invalid,
            HTTPException: lambda request, exc: error_response(ApiError(
                exc.status_code, {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error"),
                f"{request.method} {request.url.path}: {exc.detail}")),
            Exception: self._internal,
        })
        errors = {status: {"model": schema.ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
        guarded = [Depends(self._authorize)]

        def generation(model) -> dict:
            return {**errors, 200: {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                                    "description": "the answer, or with `stream` its server-sent events"}}

        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], dependencies=guarded,
                          response_model=None, responses=generation(schema.ChatCompletionResponse))
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=guarded,
                          response_model=None, responses=generation(schema.CompletionResponse))
        app.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=guarded,
                          response_model=schema.ModelList, responses=errors)
        app.add_api_route("/v1/models/{model:path}", self.model_card, methods=["GET"], dependencies=guarded,
                          response_model=schema.ModelCard, responses=errors)
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"], dependencies=guarded,
                          response_model=schema.TokenizeResponse, responses=errors)
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"], dependencies=guarded,
                          response_model=schema.DetokenizeResponse, responses=errors)
        app.add_api_route("/health", self.health, methods=["GET"], response_model=schema.Health,
                          responses={503: {"model": schema.Health}})
        app.add_api_route("/metrics", self.metrics_text, methods=["GET"], response_class=Response,
                          responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
        return app

    async def _invalid(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0]
        where = [str(part) for part in problem["loc"] if part != "body"]
        param = ".".join(where) or None
        return error_response(ApiError(400, "invalid_field", f"{param or 'body'}: {problem['msg']}", param))

    async def _internal(self, request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal_error", f"internal error: {type(exc).__name__}: {exc}"))

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid_api_key", "missing or wrong API key: send the header "
                                                   "`Authorization: Bearer <key>` with the server's --api-key")

    def _serving(self, model: str | None) -> None:
        if self.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down and admits no new requests")
        if model is not None and model != self.model:
            raise ApiError(404, "model_not_found", f"the model {model!r} does not exist; this server serves "
                                                   f"{self.model!r} (GET /v1/models)", "model")

    # -- generation ------------------------------------------------------------------

    async def chat_completions(self, body: schema.ChatCompletionRequest, request: Request) -> Response:
        self._accept(body)
        mode, only = body.tool_mode()
        chat = self.chat_tools.prepare([m.for_template() for m in body.messages], self._tools(body.tools), mode,
                                       only, body.parallel_tool_calls is not False)
        return await self._generate(request, body, "chatcmpl", [chat.messages], chat)

    async def completions(self, body: schema.CompletionRequest, request: Request) -> Response:
        self._accept(body)
        return await self._generate(request, body, "cmpl", body.prompts())

    def _accept(self, body) -> None:
        """Refuse a request this server will not run: it is closing, another model, a field it cannot serve."""
        self._serving(body.model)
        try:
            body.check_supported()
        except schema.FieldError as exc:
            raise ApiError(400, "invalid_field", str(exc), exc.param) from None

    @staticmethod
    def _tools(tools: list[schema.ToolDefinition] | None) -> list[dict]:
        return [tool.model_dump(exclude_none=True) for tool in tools or []]

    async def _generate(self, request: Request, body, prefix: str, prompts: list,
                        chat_prompt: ChatPrompt | None = None) -> Response:
        """Run a request's prompts (a chat request's one conversation, as chat_prompt prepared it) and answer."""
        chat = chat_prompt is not None
        call = Call(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), chat, body.n if isinstance(body.n, int) else 1,
                    body.include_usage, bool(body.return_tokens_as_token_ids),
                    tools=chat_prompt.use if chat else None)
        one = len(prompts) == 1
        request_ids = [call.response_id if one else f"{call.response_id}-{k}" for k in range(len(prompts))]
        params = body.sampling_params()
        if chat and chat_prompt.grammar is not None:
            params.structured_outputs = StructuredOutputs(grammar=chat_prompt.grammar)
        streams = [self.engine.generate(p, params, request_id=r, priority=-(body.priority or 0),
                                        cache_salt=body.cache_salt, tools=chat_prompt.tools if chat else None)
                   for p, r in zip(prompts, request_ids)]
        self.active.update(request_ids)
        try:
            # The first output of each prompt comes before the answer starts, so a refusal is a status, not an event.
            firsts = await self._unless_gone(request, [anext(s) for s in streams])
        except BaseException as exc:
            await _close(streams)
            self.active.difference_update(request_ids)
            if isinstance(exc, KvmuxError) and chat and chat_prompt.grammar is not None:
                raise tools_refused(exc) from None
            if isinstance(exc, KvmuxError):
                raise refused(exc, chat) from None
            if isinstance(exc, ClientGone):
                return Response(status_code=499)
            raise
        if body.stream:
            return EventStream(self._events(call, firsts, streams, request_ids), self.options.write_timeout)
        try:
            completions = await self._unless_gone(request, [Completion.collect(_after(f, s))
                                                            for f, s in zip(firsts, streams)])
        except ClientGone:
            return Response(status_code=499)
        except KvmuxError as exc:  # the engine failed under way (an actor died)
            raise refused(exc, chat) from None
        finally:
            await _close(streams)
            self.active.difference_update(request_ids)
        ended = next((s for c in completions for s in c.samples if s.finish_reason in ("abort", "error")), None)
        if ended is not None:
            raise self._ended_early(ended.finish_reason, ended.error)
        return JSONResponse(self.formatter.response(call, completions))

    async def _unless_gone(self, request: Request, awaitables: list) -> list:
        """Their results, unless the client disconnects first (ClientGone). Whatever is left unfinished (the
        client left, one of them failed, or this was cancelled) is cancelled, which aborts its request."""
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        work = asyncio.gather(*tasks)
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(gone, *tasks, return_exceptions=True)
        if work not in done:
            if work.done() and not work.cancelled():
                work.exception()  # retrieved, so asyncio reports no failure that nobody waits for
            raise ClientGone()
        return work.result()

    async def _events(self, call: Call, firsts: list, streams: list, request_ids: list[str]) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(_merged(firsts, streams)) as outputs, \
                    contextlib.aclosing(self.formatter.events(call, outputs, self._ended_event)) as events:
                async for event in events:
                    yield event
        except KvmuxError as exc:  # the engine failed under way (an actor died): the stream says so and ends
            failure = refused(exc, call.chat)
            yield json.dumps(error_body(failure.status, failure.code, failure.message))
        finally:
            await _close(streams)
            self.active.difference_update(request_ids)

    def _ended_early(self, finish_reason: str, error: str | None) -> ApiError:
        if finish_reason == "abort":
            return ApiError(503, "aborted", "the request was aborted: the server is shutting down")
        return ApiError(500, "internal_error", f"the request failed: {error}")

    def _ended_event(self, finish_reason: str, error: str | None) -> dict:
        exc = self._ended_early(finish_reason, error)
        return error_body(exc.status, exc.code, exc.message)

    # -- the rest --------------------------------------------------------------------

    def _card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "kvmux",
                "max_model_len": self.engine.max_model_len}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model_card(self, model: str) -> dict:
        if model != self.model:
            raise ApiError(404, "model_not_found", f"the model {model!r} does not exist; this server serves "
                                                   f"{self.model!r}", "model")
        return self._card()

    async def tokenize(self, body: schema.TokenizeRequest) -> dict:
        self._accept(body)
        tokenizer = self.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "invalid_field", "give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            tools = self._tools(body.tools)
            chat = self.chat_tools.prepare([m.for_template() for m in body.messages], tools,
                                           "auto" if tools else "none")
            try:
                text = tokenizer.apply_chat_template(chat.messages, tools=chat.tools)
            except Exception as exc:  # noqa: BLE001 - as admission: a template raises what it likes
                raise ApiError(400, "invalid_prompt", f"the model's chat template refused the messages: {exc}",
                               "messages") from None
            tokens = tokenizer.tokenize(text, add_special_tokens=False)
        else:
            tokens = tokenizer.tokenize(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        return {"count": len(tokens), "max_model_len": self.engine.max_model_len, "tokens": tokens}

    async def detokenize(self, body: schema.DetokenizeRequest) -> dict:
        self._serving(body.model)
        vocab = self.engine.loaded.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, "invalid_prompt", f"token id {bad} is not in the vocabulary [0, {vocab})", "tokens")
        return {"prompt": self.engine.tokenizer.detokenize(body.tokens)}

    async def health(self) -> JSONResponse:
        if self.closing:
            return JSONResponse({"status": "shutting_down"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(await self.engine.stats()), media_type=CONTENT_TYPE)
