"""The `openai` SDK against `kvmux serve --port`: a chat answer, a streamed one, and token log-probabilities."""
import argparse

from openai import OpenAI

NEEDS_SERVER = "http"  # the examples runner starts `kvmux serve --port ...` and passes its --base-url


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused")  # set one with `kvmux serve --api-key`
    model = client.models.list().data[0].id
    question = [{"role": "user", "content": "Name one planet."}]

    answer = client.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0)
    print(f"{model}: {answer.choices[0].message.content!r} ({answer.usage.completion_tokens} tokens)")

    stream = client.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0,
                                            stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    # Holds on a float32 or quantized server whatever else it runs (bf16 kernels vary with the batch's rows).
    assert streamed == answer.choices[0].message.content, "greedy output is the same streamed or not"

    scored = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3,
                                       temperature=0, logprobs=2)
    for token, logprob, top in zip(scored.choices[0].logprobs.tokens, scored.choices[0].logprobs.token_logprobs,
                                   scored.choices[0].logprobs.top_logprobs):
        print(f"  {token!r:>12} {logprob:7.3f}   alternatives: {top}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server [default: %(default)s]")
    main(parser.parse_args().base_url)
