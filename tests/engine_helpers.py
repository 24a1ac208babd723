"""Shared helpers for engine tests: running requests on an engine and the transformers reference."""
from __future__ import annotations

import asyncio

import torch

from kvmux import Engine, SamplingParams


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def assert_no_leaks(engine: Engine) -> None:
    assert engine.blocks.num_free == engine.blocks.num_blocks, (
        f"{engine.blocks.num_blocks - engine.blocks.num_free} KV blocks leaked")
    engine.blocks.check_invariants()


async def wait_for_blocks(engine: Engine, timeout: float = 10.0) -> None:
    """Aborts release blocks asynchronously; wait until the pool is whole again."""
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.blocks.num_free != engine.blocks.num_blocks and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert_no_leaks(engine)


def run_engine(model: str, prompts, params, **options):
    """Complete every prompt concurrently; returns (completions, stats) and checks nothing leaked."""
    params = params if isinstance(params, list) else [params] * len(prompts)

    async def main():
        async with Engine(model, **options) as engine:
            done = await asyncio.gather(*(engine.complete(p, sp) for p, sp in zip(prompts, params)))
            stats = await engine.stats()
            assert_no_leaks(engine)
            return done, stats

    return asyncio.run(main())


def failing_on_call(fn, n: int, message: str):
    """fn, except that its n-th call raises RuntimeError(message): a fault injected mid-run."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise RuntimeError(message)
        return fn(*args, **kwargs)
    return wrapper


def detokenizer_failing_on(prefix: list[int]):
    """The decode actor's detokenize_step, except that it raises for a sequence starting with `prefix`."""
    import kvmux.engine.decode as decode_module

    real = decode_module.detokenize_step

    def picky(tokenizer, token_ids, *args, **kw):
        if token_ids[:len(prefix)] == prefix:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(tokenizer, token_ids, *args, **kw)
    return picky


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool = False) -> list[list[int]]:
    """transformers' own generate, one prompt at a time (no padding), greedy."""
    outs = []
    for ids in prompts:
        kwargs = {} if stop_at_eos else {"eos_token_id": None}
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        outs.append(out[0, len(ids):].tolist())
    return outs
