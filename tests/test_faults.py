"""Fault injection through the server: a forward that raises mid-step, a tokenizer that raises, a swap copy
that fails, and a client that vanishes while its request is waiting, prefilling, decoding, preempted or
swapped out. Each time the requests concerned end with an error or an abort, nothing leaks on any tier, and
the next request is served.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from engine_helpers import detokenizer_failing_on, failing_on_call
from kvmux.serve.client import AsyncClient, Client, ServerError
from server_helpers import Raw, Served
from tiny_model import make_tiny_model

PROMPT = [5, 17, 33, 101, 250, 7, 9]


def greedy(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("faults") / "m"))


def slowed(tiny: str, preemption_mode: str) -> Served:
    # A small pool, two seats and small prompt chunks, so that waiting, prefilling and preemption are easy to
    # reach; every forward sleeps a little so each phase lasts long enough to be caught.
    s = Served(tiny, {"num_blocks": 8, "block_size": 8, "max_num_seqs": 2, "max_num_batched_tokens": 8,
                      "max_pending": 16, "enable_prefix_caching": False, "preemption_mode": preemption_mode})
    runner = s.engine.decode.runner
    real = runner.execute

    def slow(work):
        time.sleep(0.01)
        return real(work)
    runner.execute = slow
    return s


@pytest.fixture(scope="module")
def served(tiny):
    s = slowed(tiny, "recompute")
    yield s
    s.close()


@pytest.fixture(scope="module")
def swapping(tiny):
    s = slowed(tiny, "swap")
    yield s
    s.close()


def serves_the_next_request(served) -> None:
    served.settle()
    with Client(served.path) as client:
        assert client.complete(PROMPT, greedy(5)).num_output_tokens == 5
    served.settle()


def wait_for(served, predicate, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = served.stats()
        if predicate(stats):
            return stats
        time.sleep(0.002)
    raise AssertionError(f"never reached: last stats {stats}")


def test_forward_raising_mid_step_fails_its_batch(served):
    runner = served.engine.decode.runner
    slow = runner.execute
    runner.execute = failing_on_call(slow, 4, "injected forward fault")
    try:
        async def main():
            async with AsyncClient(served.path) as client:
                return await asyncio.gather(*(client.complete(PROMPT, greedy(12)) for _ in range(2)))
        done = asyncio.run(main())
    finally:
        runner.execute = slow
    assert [c.finish_reason for c in done] == ["error", "error"]
    assert all("injected forward fault" in c.error for c in done)
    serves_the_next_request(served)


def test_tokenizer_raising_fails_only_its_request(served):
    tokenizer = served.engine.tokenizer
    real = tokenizer.encode

    def picky(text, *args, **kw):
        if "boom" in text:
            raise RuntimeError("injected tokenizer fault")
        return real(text, *args, **kw)
    tokenizer.encode = picky
    try:
        async def main():
            async with AsyncClient(served.path) as client:
                good = asyncio.create_task(client.complete(PROMPT, greedy(10)))
                with pytest.raises(ServerError, match="injected tokenizer fault") as info:
                    await client.complete("boom goes the tokenizer", greedy(4))
                assert info.value.code == "internal_error"
                assert (await good).num_output_tokens == 10
        asyncio.run(main())
    finally:
        del tokenizer.encode
    serves_the_next_request(served)


def test_detokenizer_raising_fails_only_its_request(served, monkeypatch):
    import kvmux.engine.decode as decode_module

    bad = [9, 9, 9, 9, 9]
    monkeypatch.setattr(decode_module, "detokenize_step", detokenizer_failing_on(bad))

    async def main():
        async with AsyncClient(served.path) as client:
            return await asyncio.gather(client.complete(PROMPT, greedy(10)), client.complete(bad, greedy(10)))
    good, broken = asyncio.run(main())
    monkeypatch.undo()
    assert good.num_output_tokens == 10
    assert broken.finish_reason == "error" and "injected" in broken.error
    serves_the_next_request(served)


# -- the client vanishes ------------------------------------------------------------------

def test_vanish_while_waiting(served):
    busy = Raw(served.path)
    for i in range(2):  # both seats taken for a while
        busy.send({"op": "generate", "id": f"busy{i}", "prompt": PROMPT, "params": greedy(12)})
    wait_for(served, lambda s: s["running"] == 2)
    gone = Raw(served.path)
    gone.send({"op": "generate", "id": "w", "prompt": PROMPT, "params": greedy(12)})
    wait_for(served, lambda s: s["waiting"] == 1)
    gone.close()
    wait_for(served, lambda s: s["waiting"] == 0 and s["requests_live"] == 2)
    assert busy.until_finished("busy0", "busy1")["busy0"]["finish_reason"] == "length"
    busy.close()
    serves_the_next_request(served)


def test_vanish_while_prefilling(served):
    gone = Raw(served.path)
    # 47 prompt tokens at 8 per step: several steps of prefill.
    gone.send({"op": "generate", "id": "p", "prompt": list(range(3, 50)), "params": greedy(4)})
    wait_for(served, lambda s: s["prefilling"] == 1)
    gone.close()
    serves_the_next_request(served)


def test_vanish_while_decoding(served):
    gone = Raw(served.path)
    gone.send({"op": "generate", "id": "d", "prompt": PROMPT, "params": greedy(40)})
    for _ in range(3):
        assert gone.recv()["type"] == "output"
    assert served.stats()["running"] == 1
    gone.close()
    serves_the_next_request(served)


def test_vanish_while_preempted(served):
    before = served.stats()["preemptions"]
    first, second = start_pair(served)
    stats = wait_for(served, lambda s: s["preempted_waiting"] == 1)
    assert stats["preemptions"] > before
    second.close()  # the preempted one's client vanishes
    last = first.until_finished("a")
    assert last["finish_reason"] == "length" and last["num_output_tokens"] == 40
    first.close()
    serves_the_next_request(served)


def start_pair(served) -> tuple[Raw, Raw]:
    """Two sequences of 7 + 40 tokens need 6 blocks each of the 8: the later one is preempted as they grow."""
    first, second = Raw(served.path), Raw(served.path)
    first.send({"op": "generate", "id": "a", "prompt": PROMPT, "params": greedy(40)})
    wait_for(served, lambda s: s["running"] == 1)
    second.send({"op": "generate", "id": "b", "prompt": PROMPT[::-1], "params": greedy(40)})
    return first, second


def test_vanish_while_swapped(swapping):
    first, second = start_pair(swapping)
    wait_for(swapping, lambda s: s["swapped"] == 1 and s["host_blocks_used"] > 0)
    second.close()  # the swapped-out one's client vanishes: its host blocks must come back too
    last = first.until_finished("a")
    assert last["finish_reason"] == "length" and last["num_output_tokens"] == 40
    first.close()
    serves_the_next_request(swapping)


def test_swap_copy_failure_fails_only_what_it_concerns(swapping):
    swapper = swapping.engine.decode.runner.swapper
    real = swapper.apply
    failed = 0

    def broken(ops):
        nonlocal failed
        if ops and not failed:
            failed += 1
            raise RuntimeError("injected swap copy fault")
        return real(ops)
    swapper.apply = broken
    try:
        first, second = start_pair(swapping)
        last = [first.until_finished("a"), second.until_finished("b")]
        first.close(), second.close()
    finally:
        del swapper.apply
    assert failed == 1
    assert any(f["finish_reason"] == "error" and "injected swap copy fault" in f["error"] for f in last)
    serves_the_next_request(swapping)
