"""Quickstart: load a model with the asyncio API and stream one chat answer."""
import argparse
import asyncio

from kvmux import Engine, SamplingParams


async def main(model: str | None) -> None:
    async with Engine(model) as engine:
        messages = [{"role": "user", "content": "What is a KV cache? Answer in one sentence."}]
        params = SamplingParams(max_tokens=48, temperature=0)  # temperature 0: greedy, reproducible
        async for out in engine.generate(messages, params):
            print(out.text, end="", flush=True)
        print(f"\n[{out.num_prompt_tokens} prompt tokens, {out.num_output_tokens} output tokens, "
              f"finish: {out.finish_reason}]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="safetensors folder or .gguf file (default: SmolLM2-135M-Instruct)")
    asyncio.run(main(parser.parse_args().model))
