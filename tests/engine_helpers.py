"""What engine tests share: the prompt set, the greedy parameters, the transformers reference, leak checks,
fault injection, and a gate that holds the engine's forwards so tests order events without sleeping."""
from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import asdict

import torch

from kvmux import Engine, SamplingParams

PROMPT = [5, 17, 33, 101, 250, 7, 9]
MAX_NEW = 32  # tokens of the reference continuations
# Lengths around the block sizes tests use (8, 16, 32), and long enough to need several blocks.
PROMPTS = [random.Random(n).choices(range(3, 320), k=n) for n in (1, 3, 7, 8, 9, 15, 16, 17, 30, 41, 57, 64)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    """Greedy decoding of exactly max_tokens tokens (end-of-sequence does not stop it)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def wire(params: SamplingParams) -> dict:
    """The params as a socket frame carries them."""
    return asdict(params)


def random_prompt(seed: int, n: int) -> list[int]:
    return random.Random(seed).choices(range(3, 320), k=n)


def assert_no_leaks(engine: Engine) -> None:
    """Nothing is held on any tier: every device, sliding-window and host block is free, nothing is swapped out."""
    blocks = engine.blocks
    assert blocks.num_free == blocks.num_blocks, f"{blocks.num_blocks - blocks.num_free} device blocks leaked"
    assert blocks.num_sliding_used == 0, f"{blocks.num_sliding_used} sliding-window slots leaked"
    host = blocks.tiers.host
    assert host.num_free == host.num_blocks, f"{host.num_blocks - host.num_free} host blocks leaked"
    assert not engine.eviction.swapped, f"sequences left swapped out: {list(engine.eviction.swapped)}"
    blocks.check_invariants()
    draft = engine.decode.speculator and engine.decode.speculator.draft
    if draft is not None:
        assert draft.blocks.num_used == 0, f"{draft.blocks.num_used} of the draft model's blocks leaked"
        draft.blocks.check_invariants()


async def settled(engine: Engine, timeout: float = 30.0, busy=lambda: False) -> None:
    """Wait until no request is live (aborts end requests asynchronously) and busy() is false, then check
    nothing leaked. Both run in one turn of the engine's loop, so no request can start in between."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.admission.live or busy():
        assert loop.time() < deadline, f"requests still live: {list(engine.admission.live)}"
        await asyncio.sleep(0.002)
    assert_no_leaks(engine)


async def until(condition, timeout: float = 30.0) -> None:
    """Yield to the event loop (the engine's, when run there) until condition() holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def run_engine(model: str | None, prompts, params, **options):
    """Complete every prompt concurrently; returns (completions, stats) and checks nothing leaked.

    In float32 unless options say otherwise: what transformers' references are computed in (the engine's
    default, auto, is bf16 on CPUs with bf16 units)."""
    params = params if isinstance(params, list) else [params] * len(prompts)

    async def main():
        async with Engine(model, **{"dtype": "float32", **options}) as engine:
            done = await asyncio.gather(*(engine.complete(p, sp) for p, sp in zip(prompts, params)))
            stats = await engine.stats()
            assert_no_leaks(engine)
            return done, stats

    return asyncio.run(main())


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool = False) -> list[list[int]]:
    """transformers' own generate, one prompt at a time (no padding), greedy."""
    outs = []
    for ids in prompts:
        kwargs = {} if stop_at_eos else {"eos_token_id": None}
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        outs.append(out[0, len(ids):].tolist())
    return outs


def teacher_forced_logits(model, ids: list[int], block_size: int = 16, kv_dtype: torch.dtype | None = None
                          ) -> torch.Tensor:
    """The model's next-token logits at every position of `ids`: one forward over a fresh KV pool (of kv_dtype,
    default the model's)."""
    from kvmux.cache.kv_cache import KVCache, PoolGeometry
    from kvmux.step.forward_batch import ForwardBatch
    from kvmux.step.work import Chunk

    blocks = -(-len(ids) // block_size)
    cache = KVCache(blocks, PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, block_size,
                                         kv_dtype or model.dtype))
    batch = ForwardBatch.build([Chunk("text", 0, ids, list(range(blocks)))], block_size)
    batch.logits_indices = torch.arange(len(ids))
    with torch.inference_mode():
        return model(batch, cache)


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


def kill_decode_at_step(engine: Engine, n: int) -> None:
    """Make the decode actor die at its n-th step: the step fails, and so does failing its batch, which is what
    no handler catches."""
    decode = engine.decode
    decode._build = failing_on_call(decode._build, n, "injected bookkeeping fault")
    decode._fail_batch = failing_on_call(decode._fail_batch, 1, "injected failure while failing")


def detokenizer_failing_on(prefix: list[int]):
    """The decode actor's detokenize_step, except that it raises for a sequence starting with `prefix`."""
    import kvmux.engine.decode as decode_module

    real = decode_module.detokenize_step

    def picky(tokenizer, token_ids, *args, **kw):
        if token_ids[:len(prefix)] == prefix:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(tokenizer, token_ids, *args, **kw)
    return picky


class ForwardGate:
    """Holds an engine's forwards until the test lets them through.

    While a forward waits at the gate, the engine is frozen at a known point:
    the step's sequences are running (or prefilling), nothing of the step is
    computed, and `stats()` still answers. The test then moves the engine on
    one forward at a time, so it orders events without sleeping or racing.

        with ForwardGate(engine) as gate:   # held from the start
            ...submit...
            gate.wait_held()                 # a forward waits: the step's state is fixed
            gate.allow(2)                    # two forwards pass, the third waits again
            gate.release()                   # open for good
    """

    def __init__(self, engine: Engine, held: bool = True) -> None:
        self._runner = engine.decode.runner
        self._real = self._runner.execute
        self._cond = threading.Condition()
        self._allowed: int | None = 0 if held else None  # None: open
        self._waiting = 0
        self.passed = 0
        self._runner.execute = self._execute

    def _execute(self, work):
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._allowed is None or self._allowed > 0)
            if self._allowed is not None:
                self._allowed -= 1
            self._waiting -= 1
            self.passed += 1
            self._cond.notify_all()
        return self._real(work)

    def wait_held(self, timeout: float = 60.0) -> None:
        """Block until a forward is waiting at the closed gate."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting > 0 and self._allowed == 0, timeout):
                raise AssertionError("no forward reached the gate")

    async def held(self, timeout: float = 60.0) -> None:
        """wait_held for a test running on the engine's own event loop."""
        await asyncio.to_thread(self.wait_held, timeout)

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._allowed = (self._allowed or 0) + n
            self._cond.notify_all()

    def hold(self) -> None:
        with self._cond:
            self._allowed = 0

    def release(self) -> None:
        with self._cond:
            self._allowed = None
            self._cond.notify_all()

    def __enter__(self) -> ForwardGate:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._runner.execute = self._real
