"""The OpenAI-compatible HTTP server, driven by the official `openai` SDK (sync and async, streaming and not, chat
and completions) and by raw HTTP for what the SDK hides (SSE framing, disconnects, bounds): outputs equal the
engine's token for token, errors are OpenAI's objects with the right statuses, and no block ever leaks."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from http.client import HTTPConnection

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmux.sampling import SamplingParams
from kvmux.serve.client import Client

from engine_helpers import PROMPT, PROMPTS, ForwardGate, failing_on_call, greedy, kill_decode_at_step
from server_helpers import ServedHttp, serve_http, short_dir

CHAT = [{"role": "user", "content": "hello world"}]
EXACT = {"ignore_eos": True, "return_tokens_as_token_ids": True}  # exact lengths; logprobs name token ids


@pytest.fixture(scope="module")
def http(tiny):
    s = ServedHttp(tiny)
    yield s
    s.close()


@pytest.fixture(scope="module")
def guarded(tiny):
    """A server with an API key, room for two unfinished requests, and a short read timeout (long enough that
    the SDK's own bodies, sent apart from their headers, arrive in time on a loaded machine)."""
    s = ServedHttp(tiny, {"max_pending": 2}, api_key="s3cret", read_timeout=2.0)
    yield s
    s.close()


def ids_of(tokens: list[str]) -> list[int]:
    """Token ids from logprob entries named "token_id:<id>"."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


def raw(http: ServedHttp, method: str, path: str, body=None, headers: dict | None = None):
    conn = HTTPConnection("127.0.0.1", http.server.port, timeout=60)
    data = json.dumps(body) if isinstance(body, (dict, list)) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    content = response.read()
    conn.close()
    return response.status, response, content


def events(content: bytes) -> list[str]:
    """The data of each server-sent event, checking the framing: `data: <one line>` events split by blank lines."""
    text = content.decode()
    assert text.endswith("\n\n")
    frames = text[:-2].split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    return [f[len("data: "):] for f in frames]


def metric(http: ServedHttp, name: str, **labels) -> float:
    status, _, content = raw(http, "GET", "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(content.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# -- outputs -----------------------------------------------------------------------------

def test_greedy_over_http_equals_engine_generate(http):
    client = http.client()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    expected = http.call(http.engine.complete(CHAT, params))
    whole = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                           extra_body=EXACT)
    choice = whole.choices[0]
    assert ids_of([c.token for c in choice.logprobs.content]) == expected.token_ids
    assert [c.logprob for c in choice.logprobs.content] == pytest.approx(expected.logprobs)
    assert (choice.message.content, choice.finish_reason, choice.index) == (expected.text, "length", 0)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        expected.num_prompt_tokens, 12, expected.num_prompt_tokens + 12)
    assert whole.object == "chat.completion" and whole.model == "m" and whole.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=12, temperature=0,
                                                 logprobs=True, stream=True, extra_body=EXACT))
    streamed = [c for chunk in chunks for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert ids_of([c.token for c in streamed]) == expected.token_ids
    assert "".join(ch.delta.content or "" for chunk in chunks for ch in chunk.choices) == expected.text

    for prompt in (PROMPT, "the quick brown fox"):
        expected = http.call(http.engine.complete(prompt, params))
        done = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                         extra_body=EXACT)
        assert ids_of(done.choices[0].logprobs.tokens) == expected.token_ids
        assert done.choices[0].text == expected.text and done.usage.prompt_tokens == expected.num_prompt_tokens
        assert done.object == "text_completion" and done.id.startswith("cmpl-")
    http.settle()


def test_sse_framing_parallel_samples_and_usage(http):
    body = {"model": "m", "messages": CHAT, "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    expected = http.call(http.engine.complete(CHAT, SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=2,
                                                                   ignore_eos=True)))
    status, response, content = raw(http, "POST", "/v1/chat/completions", body)
    assert status == 200 and response.getheader("content-type").startswith("text/event-stream")
    data = events(content)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    *parts, last = chunks
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": expected.num_prompt_tokens, "completion_tokens": 12,
        "total_tokens": expected.num_prompt_tokens + 12}
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in parts)
    for sample in expected.samples:
        mine = [c["choices"][0] for c in parts if c["choices"][0]["index"] == sample.index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + ["length"]
        assert "".join(m["delta"].get("content", "") for m in mine) == sample.text

    status, _, content = raw(http, "POST", "/v1/completions", {
        "model": "m", "prompt": [PROMPT, PROMPT[:3]], "max_tokens": 4, "temperature": 0, "stream": True,
        "ignore_eos": True})
    choices = [json.loads(d)["choices"][0] for d in events(content)[:-1]]
    for index, prompt in enumerate([PROMPT, PROMPT[:3]]):
        text = http.call(http.engine.complete(prompt, greedy(4))).text
        mine = [c for c in choices if c["index"] == index]
        assert "".join(c["text"] for c in mine) == text and mine[-1]["finish_reason"] == "length"
    http.settle()


def test_parallel_samples_stop_and_seed(http):
    client = http.client()
    first = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=1.0, seed=11, n=3,
                                           extra_body={"ignore_eos": True})
    again = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=1.0, seed=11, n=3,
                                           extra_body={"ignore_eos": True})
    other = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=1.0, seed=12, n=3,
                                           extra_body={"ignore_eos": True})
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # the same seed, the same answer
    assert texts != [c.message.content for c in other.choices]
    expected = http.call(http.engine.complete(CHAT, SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=3,
                                                                   ignore_eos=True)))
    assert texts == [s.text for s in expected.samples]

    text = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = text[5:7]
    cut = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    http.settle()


def test_logprobs_on_both_endpoints(http):
    client = http.client()
    chat = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0.7, seed=2,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    text = client.completions.create(model="m", prompt="hello", max_tokens=5, logprobs=2, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    lp = text.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(max(top.values()) == pytest.approx(logprob) for top, logprob in zip(lp.top_logprobs, lp.token_logprobs))
    assert client.completions.create(model="m", prompt="hello", max_tokens=2).choices[0].logprobs is None
    http.settle()


def test_async_clients_stream_and_not(http):
    async def main():
        client = http.async_client()
        whole = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0)
        stream = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return whole.choices[0].message.content, text

    whole, streamed = asyncio.run(main())
    assert whole == streamed
    http.settle()


def test_two_hundred_concurrent_streams_are_exact(http, reference):
    prompts = PROMPTS[:8]

    async def one(client, i):
        stream = await client.completions.create(model="m", prompt=prompts[i % len(prompts)], max_tokens=6,
                                                 temperature=0, logprobs=0, stream=True, extra_body=EXACT)
        return ids_of([t for c in [c async for c in stream] for t in (c.choices[0].logprobs.tokens
                                                                      if c.choices[0].logprobs else [])])

    async def main():
        client = http.async_client()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(200)))
        finally:
            await client.close()

    outputs = asyncio.run(main())
    assert outputs == [reference[i % len(prompts)][:6] for i in range(200)]
    http.settle()


def test_cache_salt_isolates_prefix_caches_over_http(http):
    client = http.client()
    prompt = PROMPTS[-1]  # 64 tokens: 7 full blocks of 8 the cache may serve

    def hits_of(salt):
        before = http.stats()["prefix_cache_hits"]
        client.completions.create(model="m", prompt=prompt, max_tokens=2, extra_body={"cache_salt": salt})
        return http.stats()["prefix_cache_hits"] - before

    assert [hits_of(s) for s in ("tenant-a", "tenant-b", "tenant-a", "tenant-b")] == [0, 0, 56, 56]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt=prompt, max_tokens=2, extra_body={"cache_salt": ""})
    assert info.value.body["param"] == "cache_salt"
    http.settle()


# -- the other routes ----------------------------------------------------------------------

def test_models_health_tokenize_detokenize(http):
    client = http.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["m"] and models.data[0].owned_by == "kvmux"
    assert client.models.retrieve("m").id == "m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    status, _, content = raw(http, "GET", "/health")
    assert (status, json.loads(content)) == (200, {"status": "ok"})
    status, _, content = raw(http, "POST", "/tokenize", {"prompt": "hello world"})
    tokens = json.loads(content)["tokens"]
    assert status == 200 and tokens == http.engine.tokenizer.tokenize("hello world")
    assert json.loads(raw(http, "POST", "/detokenize", {"tokens": tokens})[2]) == {"prompt": "hello world"}
    status, _, content = raw(http, "POST", "/tokenize", {"messages": CHAT})
    chat_tokens = json.loads(content)["tokens"]
    assert len(chat_tokens) == http.call(http.engine.complete(CHAT, greedy(1))).num_prompt_tokens
    assert raw(http, "POST", "/detokenize", {"tokens": [999999]})[0] == 400
    assert raw(http, "POST", "/tokenize", {"prompt": "a", "messages": CHAT})[0] == 400


COUNTED = [("kvmux_requests_finished_total", {"finish_reason": "length"}), ("kvmux_generation_tokens_total", {}),
           ("kvmux_time_to_first_token_seconds_count", {}), ("kvmux_e2e_request_latency_seconds_count", {}),
           ("kvmux_http_requests_total", {"route": "/v1/completions", "status": "200"}),
           ("kvmux_requests_rejected_total", {"code": "invalid_params"})]


def test_metrics_count_requests_and_read_the_engine(http):
    http.settle()
    before = [metric(http, name, **labels) for name, labels in COUNTED]
    client = http.client()
    for _ in range(3):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=-1)
    http.settle()
    after = [metric(http, name, **labels) for name, labels in COUNTED]
    assert [a - b for a, b in zip(after, before)] == [3, 12, 3, 3, 3, 1]
    assert metric(http, "kvmux_kv_blocks_free", tier="device") == http.engine.blocks.num_blocks
    assert metric(http, "kvmux_kv_blocks_used", tier="device") == 0
    assert b'kvmux_kv_bytes{layer_group="all_layers"} 0.0' in raw(http, "GET", "/metrics")[2]  # a Llama: one pool
    assert metric(http, "kvmux_sequences", state="running") == 0
    assert metric(http, "kvmux_http_requests_total", route="/v1/completions", status="400") >= 1


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"), ({"max_tokens": "10"}, "max_tokens"), ({"n": 0}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"stream": "yes"}, "stream"), ({"tools": [{"type": "function"}]}, "tools.0.function"), ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"seed": 2**64}, "seed"), ({"max_tokens": 100000}, "messages"),
])
def test_bad_chat_requests_are_400_naming_the_field(http, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        http.client().chat.completions.create(model="m", messages=CHAT, max_tokens=4, extra_body=fields)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["message"]


def test_errors_are_openai_objects_with_the_right_status(http):
    client = http.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert info.value.body["code"] == "model_not_found"
    for bad in ({"prompt": []}, {"prompt": [1, 99999]}, {"prompt": "x", "echo": True}, {"prompt": "x", "best_of": 3},
                {"prompt": ["x"] * 65}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="m", **bad)
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("POST", "/v1/chat/completions", 400)):
        got, _, content = raw(http, method, path, b"{not json" if method == "POST" else None)
        body = json.loads(content)
        assert got == status and set(body["error"]) == {"message", "type", "param", "code"}, body

def answer_to(served: ServedHttp, request: bytes) -> bytes:
    """Send raw bytes; the whole answer, up to the server closing the connection."""
    sock = socket.create_connection(("127.0.0.1", served.server.port), timeout=30)
    sock.sendall(request)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    return answer


def test_bodies_are_bounded_in_size_and_time(guarded):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    limit = guarded.server.options.max_body_bytes
    # Declared too large: refused before a byte of the body is read (then closed, so the rest is never read).
    answer = answer_to(guarded, head + b"Content-Length: %d\r\n\r\n" % (limit + 1))
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    # Chunked, so only counting finds it too large.
    chunk = b"x" * 65536
    body = (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * (limit // len(chunk) + 1) + b"0\r\n\r\n"
    answer = answer_to(guarded, head + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    # Started and never finished: answered once the read timeout has passed.
    answer = answer_to(guarded, head + b"Content-Length: 100\r\n\r\n{\"prompt\":")
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    guarded.settle()


def test_a_failed_forward_is_500_or_an_error_event(http):
    runner = http.engine.decode.runner
    real = runner.execute
    client = http.client()
    try:
        runner.execute = failing_on_call(real, 2, "injected forward fault")
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="m", prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True})
        assert "injected forward fault" in info.value.body["message"]
        runner.execute = failing_on_call(real, 2, "injected forward fault")
        with pytest.raises(openai.APIError, match="injected forward fault"):
            list(client.completions.create(model="m", prompt=PROMPT, max_tokens=8, stream=True,
                                           extra_body={"ignore_eos": True}))
    finally:
        runner.execute = real
    done = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length"
    http.settle()


def test_an_engine_that_dies_fails_what_is_in_flight(tiny):
    doomed = ServedHttp(tiny)
    try:
        kill_decode_at_step(doomed.engine, 3)  # after both requests have their first tokens
        client = doomed.async_client()

        async def streamed():
            stream = await client.completions.create(model="m", prompt=PROMPT, max_tokens=20, stream=True,
                                                     extra_body={"ignore_eos": True})
            return [chunk async for chunk in stream]

        async def main():
            with ForwardGate(doomed.engine) as gate:  # both are running when the actor dies
                runs = [asyncio.create_task(streamed()),
                        asyncio.create_task(client.completions.create(model="m", prompt=PROMPT, max_tokens=20,
                                                                      extra_body={"ignore_eos": True}))]
                await asyncio.to_thread(doomed.wait_for, lambda s: s["requests_live"] == 2)
                gate.release()
                return await asyncio.gather(*runs, return_exceptions=True)

        stream_failure, whole_failure = asyncio.run(main())
        # The stream had begun: the failure comes as an error event (the SDK raises APIError), not a status.
        assert type(stream_failure) is openai.APIError and "decode" in str(stream_failure)
        assert isinstance(whole_failure, openai.InternalServerError) and whole_failure.body["code"] == "engine_dead"
    finally:
        doomed.close()


def test_api_key_overload_and_shutting_down(guarded):
    try:
        with pytest.raises(openai.AuthenticationError):
            guarded.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            guarded.client(api_key="wrong").chat.completions.create(model="m", messages=CHAT)
        assert raw(guarded, "GET", "/health")[0] == 200  # health and metrics stay open
        client = guarded.async_client(api_key="s3cret")

        async def main():
            with ForwardGate(guarded.engine):  # two requests held in flight fill max_pending
                runs = [asyncio.create_task(client.completions.create(model="m", prompt=PROMPT, max_tokens=4,
                                                                    extra_body={"ignore_eos": True}))
                        for _ in range(2)]
                await asyncio.to_thread(guarded.wait_for, lambda s: s["requests_live"] == 2)
                with pytest.raises(openai.RateLimitError) as info:
                    await client.completions.create(model="m", prompt=PROMPT, max_tokens=4)
                assert info.value.body["code"] == "overloaded"
            return [r.choices[0].finish_reason for r in await asyncio.gather(*runs)]

        assert asyncio.run(main()) == ["length", "length"]
        guarded.settle()
        # A closing server refuses new work with 503 (uvicorn closes its listener at once, so over the network
        # this shows only to requests already on their way; the flag is what they meet).
        guarded.server.closing = True
        with pytest.raises(openai.InternalServerError) as info:
            guarded.client(api_key="s3cret").completions.create(model="m", prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503 and raw(guarded, "GET", "/health")[0] == 503
    finally:
        guarded.server.closing = False


# -- hostile clients ----------------------------------------------------------------------------

def open_stream(http: ServedHttp, body: dict) -> socket.socket:
    """A raw connection that has sent a request and read the start of its answer."""
    sock = socket.create_connection(("127.0.0.1", http.server.port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def test_disconnect_mid_stream_frees_blocks(http):
    records = []
    http.engine.request_listeners.append(records.append)
    try:
        with ForwardGate(http.engine) as gate:
            sock = open_stream(http, {"model": "m", "prompt": PROMPT, "max_tokens": 200, "stream": True,
                                      "ignore_eos": True})
            gate.allow(1)
            # The answer's head goes out with its first token (whose text, half a character perhaps, may be held
            # back, so no data event need follow while the gate holds).
            start = b""
            while b"\r\n\r\n" not in start:
                piece = sock.recv(65536)
                assert piece, f"the server closed the connection after {start!r}"
                start += piece
            assert start.startswith(b"HTTP/1.1 200"), start
            gate.wait_held()
            assert http.engine.blocks.num_free < http.engine.blocks.num_blocks
            sock.close()
            # A whole (not streamed) answer's client leaving aborts it too.
            sock = open_stream(http, {"model": "m", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True})
            http.wait_for(lambda s: s["requests_live"] == 2)
            sock.close()
            gate.release()
            http.settle()
    finally:
        http.engine.request_listeners.remove(records.append)
    assert [r.finish_reasons for r in records] == [["abort"], ["abort"]]
    assert all(r.num_output_tokens < 200 for r in records)


# -- the process -----------------------------------------------------------------------------

def test_serve_http_and_socket_together_and_sigterm_drains(tiny):
    path = os.path.join(short_dir(), "h.sock")
    server, url = serve_http("--socket", path, "--served-model-name", "tiny", "--model", tiny, "--num-blocks", "64",
                             "--block-size", "8", "--grace-period", "30")
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with Client(path) as socket_client:  # the same engine answers on the socket
            assert socket_client.complete(PROMPT, greedy(3)).num_output_tokens == 3
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=120, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        first = next(iter(stream))
        server.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"  # the grace period let it finish
        assert sum(1 for c in [first, *rest] if c.choices[0].text) <= 120
        assert server.wait(timeout=60) == 0, server.stdout.read()
        assert not os.path.exists(path)
    finally:
        if server.poll() is None:
            server.kill()
