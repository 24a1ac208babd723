"""Sampling, stopping, aborts, bad input and failures: each request gets what it asked for, and nothing leaks."""
import asyncio
import contextlib
import random

import pytest

from kvmux import LLM, Engine, KvmuxError, RequestRejected, SamplingParams
from kvmux.engine import messages
from kvmux.engine.detokenize import detokenize_step, initial_offsets

from engine_helpers import (
    PROMPT,
    ForwardGate,
    assert_no_leaks,
    detokenizer_failing_on,
    failing_on_call,
    greedy,
    run_engine,
    settled,
    until,
)


def engine(tiny, **options):
    return Engine(tiny, **{"num_blocks": 128, "block_size": 8, "dtype": "float32", **options})


def sampled(seed, max_tokens=16, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, **kw)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    alone, _ = run_engine(tiny, [PROMPT], sampled(1234), num_blocks=64, block_size=8)
    rng = random.Random(0)
    crowd = [[rng.randrange(3, 320) for _ in range(rng.randrange(2, 40))] for _ in range(7)]
    together, _ = run_engine(tiny, crowd[:3] + [PROMPT] + crowd[3:],
                             [sampled(s) for s in range(3)] + [sampled(1234)] + [sampled(s) for s in range(3, 7)],
                             num_blocks=64, block_size=8, max_num_batched_tokens=16)
    assert together[3].token_ids == alone[0].token_ids
    different, _ = run_engine(tiny, [PROMPT] * 4, [sampled(s) for s in (1, 2, 3, 4)], num_blocks=64, block_size=8)
    assert len({tuple(c.token_ids) for c in different}) > 1


def test_top_k_one_is_greedy_and_top_p_tiny_is_greedy(tiny):
    done, _ = run_engine(tiny, [PROMPT] * 3,
                         [greedy(16), sampled(5, top_k=1), sampled(6, top_p=1e-6)], num_blocks=64, block_size=8)
    assert done[1].token_ids == done[0].token_ids
    assert done[2].token_ids == done[0].token_ids


def test_max_tokens_stop_token_ids_and_stop_strings(tiny):
    base, _ = run_engine(tiny, [PROMPT], greedy(24), num_blocks=64, block_size=8)
    ids = base[0].token_ids
    assert len(ids) == 24 and base[0].finish_reason == "length"
    stop_id = ids[5]
    first = ids.index(stop_id)
    by_id, _ = run_engine(tiny, [PROMPT], greedy(24, stop_token_ids=[stop_id]), num_blocks=64, block_size=8)
    assert by_id[0].finish_reason == "stop"
    assert by_id[0].token_ids == ids[:first + 1]

    text = base[0].text
    needle = text[len(text) // 2:len(text) // 2 + 2]
    assert needle
    by_text, _ = run_engine(tiny, [PROMPT], greedy(24, stop=[needle]), num_blocks=64, block_size=8)
    assert by_text[0].finish_reason == "stop"
    assert by_text[0].text == text[:text.index(needle)]


def test_streamed_text_handles_multibyte_characters(tiny):
    async def main():
        async with engine(tiny) as e:
            text = "naïve café — 日本語 🙂 ok"
            ids = e.tokenizer.tokenize(text)
            assert len(ids) > len(text.encode()) // 2  # the byte-level tokenizer splits these characters
            # Feed the text's tokens one at a time as if they were being generated.
            pieces, (prefix, read) = [], initial_offsets(0)
            for n in range(1, len(ids) + 1):
                piece, prefix, read = detokenize_step(e.tokenizer, ids[:n], prefix, read, final=n == len(ids))
                assert "\ufffd" not in piece
                pieces.append(piece)
            assert "".join(pieces) == text
            # And the engine's stream concatenates to the decode of its tokens.
            got = await e.complete(PROMPT, sampled(3, max_tokens=40))
            assert got.text == e.tokenizer.detokenize(got.token_ids, skip_special_tokens=True)
    asyncio.run(main())


def test_abort_by_cancel_and_by_id(tiny):
    async def main():
        async with engine(tiny) as e:
            stream = e.generate(PROMPT, greedy(200))
            async for _ in stream:
                break
            await stream.aclose()
            await settled(e)

            outs = []
            async def consume():
                async for out in e.generate(PROMPT, greedy(200), request_id="victim"):
                    outs.append(out)
                    if len(outs) == 2:
                        await e.abort("victim")
            await asyncio.wait_for(consume(), 30)
            assert outs[-1].finish_reason == "abort" and outs[-1].finished
            assert len(outs) < 200
            await settled(e)
            # The engine goes on serving.
            ok = await e.complete(PROMPT, greedy(4))
            assert ok.finish_reason == "length"
    asyncio.run(main())


@pytest.mark.parametrize("prompt, params, code", [
    (list(range(3, 300)), greedy(10), "prompt_too_long"),  # the tiny model's context is 256
    (PROMPT, greedy(1000), "prompt_too_long"),
    (PROMPT, SamplingParams(max_tokens=0), "invalid_params"),
    (PROMPT, SamplingParams(temperature=-1), "invalid_params"),
    (PROMPT, SamplingParams(top_p=0), "invalid_params"),
    ([], greedy(4), "invalid_prompt"),
    ([5, 99999], greedy(4), "invalid_prompt"),
    ("", greedy(4), "invalid_prompt"),
])
def test_bad_requests_are_rejected_while_others_go_on(tiny, prompt, params, code):
    async def main():
        async with engine(tiny) as e:
            good = asyncio.create_task(e.complete(PROMPT, greedy(20)))
            with pytest.raises(RequestRejected) as info:
                await e.complete(prompt, params)
            assert info.value.code == code
            assert (await good).num_output_tokens == 20
            assert_no_leaks(e)
    asyncio.run(main())


def test_pool_too_small_for_a_request_is_rejected(tiny):
    async def main():
        async with engine(tiny, num_blocks=4) as e:  # 32 tokens
            with pytest.raises(RequestRejected, match="KV pool") as info:
                await e.complete(PROMPT, greedy(30))
            assert info.value.code == "prompt_too_long"
    asyncio.run(main())


def test_duplicate_request_id_is_rejected(tiny):
    async def main():
        async with engine(tiny) as e:
            first = asyncio.create_task(e.complete(PROMPT, greedy(30), request_id="same"))
            await asyncio.sleep(0)
            with pytest.raises(RequestRejected) as info:
                await e.complete(PROMPT, greedy(3), request_id="same")
            assert info.value.code == "duplicate_request_id"
            assert (await first).num_output_tokens == 30
    asyncio.run(main())


def test_overloaded_past_max_pending(tiny):
    async def main():
        async with engine(tiny, max_pending=2) as e:
            with ForwardGate(e) as gate:  # the two stay in flight until the gate opens
                runs = [asyncio.create_task(e.complete(PROMPT, greedy(30))) for _ in range(2)]
                await gate.held()
                while (await e.stats())["requests_live"] < 2:
                    gate.allow(1)
                    await gate.held()
                with pytest.raises(RequestRejected) as info:
                    await e.complete(PROMPT, greedy(3))
                assert info.value.code == "overloaded"
                gate.release()
                assert [r.num_output_tokens for r in await asyncio.gather(*runs)] == [30, 30]
            assert (await e.complete(PROMPT, greedy(3))).num_output_tokens == 3
    asyncio.run(main())


def test_failed_forward_fails_its_batch_not_the_engine(tiny):
    async def main():
        async with engine(tiny) as e:
            runner = e.decode.runner
            runner.execute = failing_on_call(runner.execute, 3, "injected fault")
            done = await asyncio.gather(*(e.complete(PROMPT, greedy(10)) for _ in range(3)))
            assert {c.finish_reason for c in done} == {"error"}
            assert all("injected fault" in c.error for c in done)
            assert_no_leaks(e)
            ok = await e.complete(PROMPT, greedy(5))
            assert ok.finish_reason == "length" and ok.num_output_tokens == 5
            assert_no_leaks(e)
    asyncio.run(main())


def test_forward_runs_off_the_event_loop(tiny):
    """While a forward is held, the loop still admits, refuses and answers: a forward on the loop's own thread
    would block all of that, and with it the test that holds the gate (a timeout, not a pass)."""
    async def main():
        async with engine(tiny) as e:
            with ForwardGate(e) as gate:
                run = asyncio.create_task(e.complete(PROMPT, greedy(6)))
                await gate.held()
                with pytest.raises(RequestRejected):
                    await asyncio.wait_for(e.complete(PROMPT, SamplingParams(max_tokens=0)), 30)
                stats = await asyncio.wait_for(e.stats(), 30)
                assert stats["running"] == 1 and stats["steps"] == 1
                gate.release()
                assert (await run).num_output_tokens == 6
    asyncio.run(main())


def test_stop_that_arrives_during_the_last_forward_ends_the_engine(tiny):
    """The Shutdown reaches decode while the forward that ends its only request is held, so decode sees it
    only after that forward, with nothing left to run: it must stop then, not wait for another message
    (it used to sit there until stop's 30 s timeout cancelled it)."""
    async def main():
        e = engine(tiny)
        await e.start()
        with ForwardGate(e) as gate:
            run = asyncio.create_task(e.complete(PROMPT, greedy(1)))
            await gate.held()
            stop = asyncio.create_task(e.stop())
            await until(lambda: any(isinstance(m, messages.Shutdown) for m in e.decode.deferred))
            gate.release()
            await asyncio.wait_for(stop, 20)
        assert not e._tasks
        # Its caller hears of it, whether the request had finished or the engine stopped first.
        with contextlib.suppress(KvmuxError):
            assert (await asyncio.wait_for(run, 20)).num_output_tokens == 1
    asyncio.run(main())


def test_stats_report_the_pool(tiny):
    async def main():
        async with engine(tiny) as e:
            with ForwardGate(e) as gate:
                task = asyncio.create_task(e.complete(PROMPT, greedy(50)))
                await gate.held()
                stats = await e.stats()
                assert stats["running"] == 1 and stats["blocks_used"] == 1 and stats["blocks_total"] == 128
                assert stats["kv_waste"] == 1 - len(PROMPT) / 8  # 7 of the block's 8 slots are filled
                gate.release()
                await task
            stats = await e.stats()
            assert stats["output_tokens"] == 50 and stats["blocks_used"] == 0
            assert stats["requests_admitted"] == 1
    asyncio.run(main())


def test_sync_llm_wrapper(tiny):
    with LLM(tiny, num_blocks=64, block_size=8, dtype="float32") as llm:
        done = llm.generate([PROMPT, PROMPT[:3]], greedy(5))
        assert [c.num_output_tokens for c in done] == [5, 5]
        chat = llm.generate([{"role": "user", "content": "hello world"}], greedy(3))
        assert chat[0].num_prompt_tokens > 3
        assert llm.stats()["blocks_free"] == 64


def test_tokenizer_failure_ends_only_that_request(tiny):
    import kvmux.engine.decode as decode_module

    bad = [9, 9, 9, 9, 9]
    real = decode_module.detokenize_step
    picky = detokenizer_failing_on(bad)

    async def main():
        async with engine(tiny) as e:
            decode_module.detokenize_step = picky
            try:
                good, broken = await asyncio.gather(e.complete(PROMPT, greedy(12)), e.complete(bad, greedy(12)))
            finally:
                decode_module.detokenize_step = real
            assert good.finish_reason == "length" and good.num_output_tokens == 12
            assert broken.finish_reason == "error" and "injected" in broken.error
            await settled(e)
    asyncio.run(main())


def test_broken_step_fails_its_batch_and_the_engine_goes_on(tiny):
    async def main():
        async with engine(tiny) as e:
            e.decode._build = failing_on_call(e.decode._build, 2, "injected bookkeeping fault")
            done = await asyncio.gather(*(e.complete(PROMPT, greedy(8)) for _ in range(3)))
            assert any(c.finish_reason == "error" and "injected" in c.error for c in done)
            await settled(e)
            assert (await e.complete(PROMPT, greedy(4))).num_output_tokens == 4
            await settled(e)
    asyncio.run(main())


def test_default_pool_is_capped_at_what_the_seats_can_use(tiny):
    async def main():
        # 1 GiB would be ~260k blocks of the tiny model; 4 seats x 256-token context need 4 x 16 blocks of 16.
        async with Engine(tiny, max_num_seqs=4, block_size=16, dtype="float32") as e:
            assert e.blocks.num_blocks == 4 * 16
        with pytest.raises(ValueError, match="smaller than one KV block"):
            async with Engine(tiny, kv_cache_gib=1e-9):
                pass
    asyncio.run(main())
