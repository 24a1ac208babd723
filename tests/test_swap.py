"""Preemption by swap, recompute or auto: outputs never change, the right sequences are chosen, nothing leaks."""
import asyncio
import random

import pytest
import torch

from kvmux import Engine
from kvmux.cache.tiers import DEVICE, HOST, BlockCopy
from kvmux.cache.transfer import make_copier
from kvmux.engine import messages
from kvmux.engine.eviction import Policy, choose_mode, choose_victims

from engine_helpers import MAX_NEW, PROMPTS, ForwardGate, assert_no_leaks, greedy, random_prompt, run_engine

TIGHT = dict(num_blocks=12, block_size=8, dtype="float32")  # 96 slots; the prompts need ~650 together


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
@pytest.mark.parametrize("caching", [True, False])
def test_tight_pool_matches_transformers(tiny, reference, mode, caching):
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), preemption_mode=mode, enable_prefix_caching=caching,
                             **TIGHT)
    assert [c.token_ids for c in done] == reference
    assert stats["preemptions"] >= len(PROMPTS) // 2
    if mode == "swap":
        assert stats["preemptions_recompute"] == 0
        assert stats["blocks_swapped_out"] > 0 and stats["blocks_swapped_in"] > 0 and stats["block_copy_bytes"] > 0
    if mode == "recompute":
        assert stats["preemptions_swap"] == 0 and stats["recomputed_tokens"] > 0


def test_full_host_pool_falls_back_to_recompute(tiny, reference):
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), preemption_mode="swap", num_host_blocks=5, **TIGHT)
    assert [c.token_ids for c in done] == reference
    assert stats["preemptions_swap"] > 0 and stats["preemptions_recompute"] > 0


def test_shared_blocks_are_stored_on_the_host_once(tiny):
    done, stats = run_engine(tiny, [random_prompt(12, 30)], greedy(30, n=3), preemption_mode="swap", **TIGHT)
    samples = [s.token_ids for s in done[0].samples]
    assert samples[0] == samples[1] == samples[2] and len(samples[0]) == 30
    assert stats["preemptions_swap"] > 0 and stats["blocks_swap_deduplicated"] > 0


def test_higher_priority_is_preempted_last(tiny):
    rng = random.Random(13)
    low = [[rng.randrange(3, 320) for _ in range(24)] for _ in range(4)]
    high = [rng.randrange(3, 320) for _ in range(24)]

    async def main():
        async with Engine(tiny, preemption_mode="swap", **TIGHT) as engine:
            victims = []
            order = engine.eviction._order

            def recording(pressure):
                result = order(pressure)
                victims.extend(p.seq_id for p in result.preemptions)
                return result
            engine.eviction._order = recording
            # The high-priority request arrives last: by arrival alone it would be the first victim.
            runs = [engine.complete(p, greedy(40), request_id=f"low{i}") for i, p in enumerate(low)]
            runs.append(engine.complete(high, greedy(40), request_id="high", priority=1))
            done = await asyncio.gather(*runs)
            assert_no_leaks(engine)
            return done, victims

    done, victims = asyncio.run(main())
    assert all(c.finish_reason == "length" for c in done)
    assert victims and "high" not in victims


def test_abort_while_swapped_out_frees_the_host(tiny):
    rng = random.Random(14)
    prompts = [[rng.randrange(3, 320) for _ in range(30)] for _ in range(4)]

    async def main():
        async with Engine(tiny, preemption_mode="swap", num_blocks=14, block_size=8, dtype="float32") as engine:
            with ForwardGate(engine) as gate:
                runs = [asyncio.ensure_future(engine.complete(p, greedy(40), request_id=f"r{i}"))
                        for i, p in enumerate(prompts)]
                # Step by step until a sequence is out; the engine then waits at the gate while it is aborted.
                await gate.held()
                while not (await engine.stats())["swapped"]:
                    gate.allow(1)
                    await gate.held()
                victim = next(s.request_id for s, _ in engine.eviction.swapped.values())
                await engine.abort(victim)
                gate.release()
                done = await asyncio.gather(*runs)
            assert_no_leaks(engine)
            return victim, done

    victim, done = asyncio.run(main())
    for c in done:
        assert c.finish_reason == ("abort" if c.request_id == victim else "length")


# -- policy --------------------------------------------------------------------

def cand(name, arrival, priority=0, blocks=2, tokens=16):
    return messages.Candidate(name, arrival, priority, blocks, tokens)


def test_victims_lowest_priority_then_latest_arrival():
    cands = [cand("old", 1.0), cand("new", 3.0), cand("vip", 4.0, priority=2), cand("mid", 2.0)]
    assert [c.seq_id for c in choose_victims(cands, 1)] == ["new"]
    assert [c.seq_id for c in choose_victims(cands, 5)] == ["new", "mid", "old"]
    assert [c.seq_id for c in choose_victims(cands, 100)] == ["new", "mid", "old", "vip"]


def test_auto_compares_copy_and_recompute_costs():
    policy = Policy("auto", low_blocks=0, high_blocks=0, block_bytes=1000)
    # 2 blocks out and back: 4000 bytes at 1000 B/s = 4 s, against 3 tokens at 1 s each, or 16.
    assert choose_mode(policy, cand("a", 0, tokens=3), 10, seconds_per_token=1.0, copy_bytes_per_s=1000) == "recompute"
    assert choose_mode(policy, cand("a", 0, tokens=16), 10, seconds_per_token=1.0, copy_bytes_per_s=1000) == "swap"
    assert choose_mode(policy, cand("a", 0), host_free=1, seconds_per_token=1.0, copy_bytes_per_s=1e6) == "recompute"
    assert choose_mode(Policy("swap", 0, 0, 1000), cand("a", 0), 10, 0.0, 1.0) == "swap"
    assert choose_mode(Policy("recompute", 0, 0, 1000), cand("a", 0), 10, 1.0, 1e9) == "recompute"
    # A window of 2 sliding slots of 3000 bytes is copied too: 16,000 bytes out and back, 16 s against 10 tokens.
    windowed = messages.Candidate("w", 0, 0, 2, 10, num_sliding=2)
    assert choose_mode(Policy("auto", 0, 0, 1000), windowed, 10, 1.0, 1000) == "swap"
    assert choose_mode(Policy("auto", 0, 0, 1000, sliding_block_bytes=3000), windowed, 10, 1.0, 1000) == "recompute"


def test_invalid_preemption_mode_is_refused():
    with pytest.raises(ValueError, match="preemption_mode"):
        Engine(preemption_mode="drop")


# -- the CUDA block copier ----------------------------------------------------------

def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not torch.cuda.is_available() or not _cupy_available(), reason="needs CUDA and CuPy")
def test_cuda_copier_round_trip():
    kv = torch.randn(8, 2, 2, 2, 4, 16, device="cuda")
    host = torch.empty((4, *kv.shape[1:]), pin_memory=True)
    block_bytes = kv[0].numel() * 4
    copier = make_copier([kv, host, None])
    assert type(copier).__name__ == "CudaBlockCopier"
    want = kv[[1, 3]].cpu()
    copier.apply([BlockCopy(DEVICE, 1, HOST, 0), BlockCopy(DEVICE, 3, HOST, 1), BlockCopy(HOST, 0, DEVICE, 5),
                  BlockCopy(DEVICE, 5, DEVICE, 7)])
    copier.before_forward({5, 7})
    kv[6].copy_(kv[7])  # on the compute stream: must see the copies
    copier.after_forward()
    torch.cuda.synchronize()
    assert torch.equal(host[:2], want) and torch.equal(kv[6].cpu(), want[0])
    assert copier.stats()["block_copy_bytes"] == 4 * block_bytes
