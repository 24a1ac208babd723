"""Parallel sampling: several answers to one prompt, each from its own seed."""
import argparse
import asyncio

from kvmux import Engine, SamplingParams

PROMPT = [{"role": "user", "content": "Invent a name for a friendly robot."}]


async def main(model: str | None) -> None:
    # float32: a seeded sample is then the same whatever runs beside it (bf16 matmuls choose their kernel by
    # the step's row count, which can move the last bits of a logit).
    async with Engine(model, dtype="float32") as engine:
        # One request per seed here; SamplingParams(n=4) would prefill the prompt once for all four.
        seeds = [1, 2, 3, 4]
        params = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=seed) for seed in seeds]
        samples = await asyncio.gather(*(engine.complete(PROMPT, p) for p in params))
        for seed, sample in zip(seeds, samples):
            print(f"seed {seed}: {sample.text.strip()!r}")
        # The same seed gives the same sample, whatever else runs beside it.
        again = await engine.complete(PROMPT, params[0])
        assert again.token_ids == samples[0].token_ids, "a seeded sample was not reproducible"
        print("seed 1 again: identical")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="safetensors folder or .gguf file (default: SmolLM2-135M-Instruct)")
    asyncio.run(main(parser.parse_args().model))
