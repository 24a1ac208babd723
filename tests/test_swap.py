"""Preemption by swap, recompute or auto: outputs never change, the right sequences are chosen, nothing leaks."""
import asyncio
import random

import pytest
import torch

from engine_helpers import assert_no_leaks, greedy, run_engine
from kvmux import Engine
from kvmux.engine import messages as schema
from kvmux.engine.eviction import Policy, choose_mode, choose_victims
from kvmux.cache.transfer import make_swapper
from kvmux.cache.tiers import DEVICE, HOST
from tiny_model import make_tiny_model

MAX_NEW = 32
TIGHT = dict(num_blocks=12, block_size=8)  # 96 slots; the prompts below need ~560 together


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("swap") / "m", num_kv_heads=2))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(11)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in (2, 5, 8, 9, 16, 17, 23, 30, 41, 50, 57, 64)]


@pytest.fixture(scope="module")
def unconstrained(tiny, prompts):
    done, stats = run_engine(tiny, prompts, greedy(MAX_NEW), num_blocks=256, block_size=8)
    assert stats["preemptions"] == 0
    return [c.token_ids for c in done]


def run_checked(tiny, prompts, params, **options):
    """run_engine, and every tier is whole again afterwards."""
    async def main():
        async with Engine(tiny, **options) as engine:
            done = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
            stats = await engine.stats()
            assert_no_leaks(engine)
            tiers = engine.blocks.tiers
            assert tiers.host.num_free == tiers.host.num_blocks and not engine.eviction.swapped
            return done, stats

    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
@pytest.mark.parametrize("caching", [True, False])
def test_tight_pool_matches_unconstrained(tiny, prompts, unconstrained, mode, caching):
    done, stats = run_checked(tiny, prompts, greedy(MAX_NEW), preemption_mode=mode,
                              enable_prefix_caching=caching, **TIGHT)
    assert [c.token_ids for c in done] == unconstrained
    assert stats["preemptions"] >= len(prompts) // 2
    if mode == "swap":
        assert stats["preemptions_recompute"] == 0
        assert stats["blocks_swapped_out"] > 0 and stats["blocks_swapped_in"] > 0 and stats["swap_bytes"] > 0
    if mode == "recompute":
        assert stats["preemptions_swap"] == 0 and stats["recomputed_tokens"] > 0


def test_full_host_pool_falls_back_to_recompute(tiny, prompts, unconstrained):
    done, stats = run_checked(tiny, prompts, greedy(MAX_NEW), preemption_mode="swap", num_host_blocks=5, **TIGHT)
    assert [c.token_ids for c in done] == unconstrained
    assert stats["preemptions_swap"] > 0 and stats["preemptions_recompute"] > 0


def test_shared_blocks_are_stored_on_the_host_once(tiny):
    prompt = [random.Random(12).randrange(3, 320) for _ in range(30)]
    done, stats = run_checked(tiny, [prompt], greedy(30, n=3), preemption_mode="swap", num_blocks=12, block_size=8)
    samples = [s.token_ids for s in done[0].samples]
    assert samples[0] == samples[1] == samples[2] and len(samples[0]) == 30
    assert stats["preemptions_swap"] > 0 and stats["blocks_swap_deduplicated"] > 0


def test_higher_priority_is_preempted_last(tiny):
    rng = random.Random(13)
    low = [[rng.randrange(3, 320) for _ in range(24)] for _ in range(4)]
    high = [rng.randrange(3, 320) for _ in range(24)]

    async def main():
        async with Engine(tiny, preemption_mode="swap", **TIGHT) as engine:
            # The high-priority request arrives last: by arrival alone it would be the first victim.
            runs = [engine.complete(p, greedy(40), request_id=f"low{i}") for i, p in enumerate(low)]
            runs.append(engine.complete(high, greedy(40), request_id="high", priority=1))
            done = await asyncio.gather(*runs)
            assert_no_leaks(engine)
            return done, engine.eviction.recent_victims

    done, victims = asyncio.run(main())
    assert all(c.finish_reason == "length" for c in done)
    assert victims and "high" not in victims


def test_abort_while_swapped_out_frees_the_host(tiny):
    rng = random.Random(14)
    prompts = [[rng.randrange(3, 320) for _ in range(30)] for _ in range(4)]

    async def main():
        async with Engine(tiny, preemption_mode="swap", num_blocks=14, block_size=8) as engine:
            runs = [asyncio.ensure_future(engine.complete(p, greedy(40), request_id=f"r{i}"))
                    for i, p in enumerate(prompts)]
            victim = None
            while victim is None and not all(r.done() for r in runs):
                victim = next((s.request_id for s, _ in engine.eviction.swapped.values()), None)
                await asyncio.sleep(0)
            assert victim is not None, "nothing was swapped out"
            await engine.abort(victim)
            done = await asyncio.gather(*runs)
            assert_no_leaks(engine)
            assert engine.blocks.tiers.host.num_free == engine.blocks.tiers.host.num_blocks
            return victim, done

    victim, done = asyncio.run(main())
    for c in done:
        assert c.finish_reason == ("abort" if c.request_id == victim else "length")


# -- policy --------------------------------------------------------------------

def cand(name, arrival, priority=0, blocks=2, tokens=16):
    return schema.Candidate(name, arrival, priority, blocks, tokens)


def test_victims_lowest_priority_then_latest_arrival():
    cands = [cand("old", 1.0), cand("new", 3.0), cand("vip", 4.0, priority=2), cand("mid", 2.0)]
    assert [c.request_id for c in choose_victims(cands, 1)] == ["new"]
    assert [c.request_id for c in choose_victims(cands, 5)] == ["new", "mid", "old"]
    assert [c.request_id for c in choose_victims(cands, 100)] == ["new", "mid", "old", "vip"]


def test_auto_compares_copy_and_recompute_costs():
    policy = Policy("auto", low_blocks=0, high_blocks=0, block_bytes=1000)
    # 2 blocks out and back: 4000 bytes at 1000 B/s = 4 s, against 3 tokens at 1 s each, or 16.
    assert choose_mode(policy, cand("a", 0, tokens=3), 10, seconds_per_token=1.0, swap_bytes_per_s=1000) == "recompute"
    assert choose_mode(policy, cand("a", 0, tokens=16), 10, seconds_per_token=1.0, swap_bytes_per_s=1000) == "swap"
    assert choose_mode(policy, cand("a", 0), host_free=1, seconds_per_token=1.0, swap_bytes_per_s=1e6) == "recompute"
    assert choose_mode(Policy("swap", 0, 0, 1000), cand("a", 0), 10, 0.0, 1.0) == "swap"
    assert choose_mode(Policy("recompute", 0, 0, 1000), cand("a", 0), 10, 1.0, 1e9) == "recompute"


def test_invalid_preemption_mode_is_refused():
    with pytest.raises(ValueError, match="preemption_mode"):
        Engine(preemption_mode="drop")


# -- the CUDA swapper ------------------------------------------------------------

def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not torch.cuda.is_available() or not _cupy_available(), reason="needs CUDA and CuPy")
def test_cuda_swapper_round_trip():
    kv = torch.randn(8, 2, 2, 2, 4, 16, device="cuda")
    host = torch.empty((4, *kv.shape[1:]), pin_memory=True)
    swapper = make_swapper([kv, host, None])
    assert type(swapper).__name__ == "CudaSwapper"
    want = kv[[1, 3]].cpu()
    swapper.apply([(DEVICE, 1, HOST, 0), (DEVICE, 3, HOST, 1), (HOST, 0, DEVICE, 5)])
    swapper.before_forward({5})
    kv[6].copy_(kv[5])  # on the compute stream: must see the copy
    swapper.after_forward()
    torch.cuda.synchronize()
    assert torch.equal(host[:2], want) and torch.equal(kv[6].cpu(), want[0])
    assert swapper.stats()["swap_bytes"] == 3 * kv[0].numel() * 4
