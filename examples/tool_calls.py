"""Tool calling with the `openai` SDK against `kvmux serve --port`: the model calls a function, we run it and send
the result back, until the model answers in text."""
import argparse
import json

from openai import OpenAI

NEEDS_SERVER = "http"  # the examples runner starts `kvmux serve --port ...` and passes its --base-url

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}]


def get_weather(city: str) -> dict:
    return {"city": city, "temperature_c": 18, "sky": "sunny"}


FUNCTIONS = {"get_weather": get_weather}


def main(base_url: str, max_turns: int = 4) -> None:
    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for turn in range(max_turns):
        # The first turn must call a tool: "required" makes the model write a call whose arguments follow the
        # function's parameters (a grammar masks every other token). Later turns may call again or answer.
        # One call per turn: a small model asked for parallel calls tends to repeat them.
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                               tool_choice="required" if turn == 0 else "auto",
                                               parallel_tool_calls=False, temperature=0, max_tokens=128)
        message = reply.choices[0].message
        if not message.tool_calls:
            assert turn > 0, f"a required call came back as text: {message.content!r}"
            print(f"{model}: {message.content!r} ({reply.choices[0].finish_reason})")
            return
        messages.append(message)  # the assistant's calls go back in the history, with their ids
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)
            try:
                result = FUNCTIONS[call.function.name](**arguments)
            except TypeError as exc:  # under "auto" the arguments are the model's own: they may not fit
                result = {"error": str(exc)}
            print(f"called {call.function.name}({arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    print(f"still calling tools after {max_turns} turns; stopping")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server [default: %(default)s]")
    main(parser.parse_args().base_url)
