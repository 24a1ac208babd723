"""Many concurrent requests sharing one system prompt, batched together by the engine."""
import argparse
import asyncio

from kvmux import Engine, SamplingParams

SYSTEM = "You are a terse travel guide. Answer with one short sentence."
CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Delhi", "Quito", "Rome"]


async def main(model: str | None) -> None:
    async with Engine(model) as engine:
        params = SamplingParams(max_tokens=24, temperature=0)
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Why visit {city}?"}]
                 for city in CITIES]
        # gather submits them all at once: continuous batching decodes them in the same forward steps.
        answers = await asyncio.gather(*(engine.complete(chat, params) for chat in chats))
        for city, answer in zip(CITIES, answers):
            print(f"{city:>6}: {answer.text.strip()[:70]!r}")
        stats = await engine.stats()
        prompt_tokens = sum(a.num_prompt_tokens for a in answers)
        # With prefix caching the shared system prompt is computed once, so fewer prompt tokens are computed
        # than were submitted.
        print(f"{prompt_tokens} prompt tokens submitted, {stats['prompt_tokens_computed']} computed; "
              f"{stats['steps']} steps for {sum(a.num_output_tokens for a in answers)} output tokens")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="safetensors folder or .gguf file (default: SmolLM2-135M-Instruct)")
    asyncio.run(main(parser.parse_args().model))
