"""Fault injection through the server: a forward that raises mid-step, a tokenizer that raises, a copy that
fails, an actor that dies, and a client that vanishes while its request is waiting, prefilling, decoding,
preempted or swapped out. Each time the requests concerned end with an error or an abort, nothing leaks on
any tier, and the next request is served.

The engine is moved through the phases with a ForwardGate: with a forward held, the state a phase is
checked in cannot slip away, however fast or slow the machine.
"""
from __future__ import annotations

import asyncio

import pytest

from kvmux.serve.client import AsyncClient, Client, ServerError

from engine_helpers import (
    PROMPT,
    ForwardGate,
    detokenizer_failing_on,
    failing_on_call,
    greedy,
    kill_decode_at_step,
    wire,
)
from server_helpers import SMALL, Raw, Served, start_pair, step_until


@pytest.fixture(scope="module")
def served(tiny):
    s = Served(tiny, {**SMALL, "preemption_mode": "recompute"})
    yield s
    s.close()


@pytest.fixture(scope="module")
def swapping(tiny):
    s = Served(tiny, {**SMALL, "preemption_mode": "swap"})
    yield s
    s.close()


def serves_the_next_request(served) -> None:
    served.settle()
    with Client(served.path) as client:
        assert client.complete(PROMPT, greedy(5)).num_output_tokens == 5
    served.settle()


def test_forward_raising_mid_step_fails_its_batch(served):
    runner = served.engine.decode.runner
    real = runner.execute
    runner.execute = failing_on_call(real, 4, "injected forward fault")
    try:
        async def main():
            async with AsyncClient(served.path) as client:
                with ForwardGate(served.engine) as gate:  # both are planned into the steps before the faulty one
                    runs = [asyncio.create_task(client.complete(PROMPT, greedy(12))) for _ in range(2)]
                    await asyncio.to_thread(served.wait_for, lambda s: s["requests_live"] == 2)
                    gate.release()
                    return await asyncio.gather(*runs)
        done = asyncio.run(main())
    finally:
        runner.execute = real
    assert [c.finish_reason for c in done] == ["error", "error"]
    assert all("injected forward fault" in c.error for c in done)
    serves_the_next_request(served)


def test_tokenizer_raising_fails_only_its_request(served):
    tokenizer = served.engine.tokenizer
    real = tokenizer.tokenize

    def picky(text, *args, **kw):
        if "boom" in text:
            raise RuntimeError("injected tokenizer fault")
        return real(text, *args, **kw)
    tokenizer.tokenize = picky
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
        del tokenizer.tokenize
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


def test_a_dead_actor_fails_every_request_with_engine_dead(tiny):
    served = Served(tiny)
    try:
        kill_decode_at_step(served.engine, 1)
        with Client(served.path) as client:
            with pytest.raises(ServerError) as info:
                client.complete(PROMPT, greedy(5))
        assert info.value.code == "engine_dead" and "decode" in info.value.message
    finally:
        served.close()


# -- the client vanishes ------------------------------------------------------------------

def test_vanish_while_waiting(served):
    busy, gone = Raw(served.path), Raw(served.path)
    with ForwardGate(served.engine) as gate:
        for i in range(2):  # both seats taken
            busy.send({"op": "generate", "id": f"busy{i}", "prompt": PROMPT, "params": wire(greedy(12))})
        step_until(served, gate, lambda s: s["running"] == 2)
        gone.send({"op": "generate", "id": "w", "prompt": PROMPT, "params": wire(greedy(12))})
        served.wait_for(lambda s: s["waiting"] == 1)
        gone.close()
        served.wait_for(lambda s: s["waiting"] == 0 and s["requests_live"] == 2)
    assert busy.until_finished("busy0")["finish_reason"] == "length"
    busy.close()
    serves_the_next_request(served)


def test_vanish_while_prefilling(served):
    gone = Raw(served.path)
    with ForwardGate(served.engine) as gate:
        # 47 prompt tokens at 8 per step: several steps of prefill.
        gone.send({"op": "generate", "id": "p", "prompt": list(range(3, 50)), "params": wire(greedy(4))})
        step_until(served, gate, lambda s: s["prefilling"] == 1)
        gone.close()
    serves_the_next_request(served)


def test_vanish_while_decoding(served):
    gone = Raw(served.path)
    with ForwardGate(served.engine) as gate:
        gone.send({"op": "generate", "id": "d", "prompt": PROMPT, "params": wire(greedy(40))})
        gate.allow(3)  # the prefill step and two decode steps: three tokens
        for _ in range(3):
            assert gone.recv()["type"] == "output"
        gate.wait_held()
        assert served.stats()["running"] == 1
        gone.close()
    serves_the_next_request(served)


def test_vanish_while_preempted(served):
    before = served.stats()["preemptions"]
    with ForwardGate(served.engine) as gate:
        first, second = start_pair(served, gate)
        stats = step_until(served, gate, lambda s: s["preempted_waiting"] == 1)
        assert stats["preemptions"] > before
        second.close()  # the preempted one's client vanishes
        served.wait_for(lambda s: s["preempted_waiting"] == 0)
    last = first.until_finished("a")
    assert last["finish_reason"] == "length" and last["num_output_tokens"] == 40
    first.close()
    serves_the_next_request(served)


def test_vanish_while_swapped(swapping):
    with ForwardGate(swapping.engine) as gate:
        first, second = start_pair(swapping, gate)
        step_until(swapping, gate, lambda s: s["swapped"] == 1 and s["host_blocks_used"] > 0)
        second.close()  # the swapped-out one's client vanishes: its host blocks must come back too
    last = first.until_finished("a")
    assert last["finish_reason"] == "length" and last["num_output_tokens"] == 40
    first.close()
    serves_the_next_request(swapping)


def test_copy_failure_fails_only_what_it_concerns(swapping):
    copier = swapping.engine.decode.runner.copier
    real = copier.apply
    failed = 0

    def broken(copies):
        nonlocal failed
        if copies and not failed:
            failed += 1
            raise RuntimeError("injected block copy fault")
        return real(copies)
    copier.apply = broken
    try:
        with ForwardGate(swapping.engine) as gate:
            first, second = start_pair(swapping, gate)
            gate.release()
            last = [first.until_finished("a"), second.until_finished("b")]
        first.close(), second.close()
    finally:
        del copier.apply
    assert failed == 1
    assert any(f["finish_reason"] == "error" and "injected block copy fault" in f["error"] for f in last)
    serves_the_next_request(swapping)
