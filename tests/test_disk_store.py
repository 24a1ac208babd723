"""The disk tier outlives the engine: a restart serves what an earlier engine cached, only to engines of the same
settings and salt; torn, truncated and flipped bytes are dropped, never served; a kill -9 leaves a store that
opens; one engine per folder; `kvmux cache info|clear`."""
import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvmux import Engine, SamplingParams
from kvmux.cache.disk_store import StoreLocked

from engine_helpers import assert_no_leaks, greedy, random_prompt

OPTIONS = dict(block_size=8, dtype="float32", num_blocks=64, disk_cache_gib=0.01)
PROMPTS = [random_prompt(seed, 57) for seed in range(3)]  # 7 full blocks each, the last token's block aside
BLOCKS = 7


def run(model: str, folder: Path, prompts, params=None, **options) -> tuple[list, dict]:
    """Complete the prompts one after another on a fresh engine over `folder`; (token ids, stats)."""
    async def main():
        async with Engine(model, **{**OPTIONS, "disk_cache_dir": str(folder), **options}) as engine:
            done = [await engine.complete(p, params or greedy(6)) for p in prompts]
            stats = await engine.stats()
            assert_no_leaks(engine)
            return [c.token_ids for c in done], stats
    return asyncio.run(main())


def store_of(folder: Path) -> Path:
    (store,) = [p for p in folder.iterdir() if p.is_dir()]
    return store


def journal(folder: Path) -> list[tuple[int, int, int]]:
    """(slot, kind, hash) of every record."""
    data = (store_of(folder) / "journal.bin").read_bytes()
    return [struct.unpack_from("<IIQ", data, at) for at in range(0, len(data) - 27, 28)]


@pytest.fixture(scope="module")
def expected(tiny) -> list:
    """What the prompts give without any disk tier."""
    async def main():
        async with Engine(tiny, **OPTIONS) as engine:
            return [(await engine.complete(p, greedy(6))).token_ids for p in PROMPTS]
    return asyncio.run(main())


def test_a_restart_serves_the_prefixes_cached_before(tiny, tmp_path, expected):
    first, stats = run(tiny, tmp_path, PROMPTS)
    assert first == expected and stats["disk_blocks_written"] >= 3 * BLOCKS
    again, stats = run(tiny, tmp_path, PROMPTS)
    assert again == expected
    assert stats["disk_blocks_restored"] >= 3 * BLOCKS and stats["disk_blocks_corrupt"] == 0
    assert stats["prefix_cache_hits_disk"] == 3 * BLOCKS * 8  # every full prompt block, from the disk
    assert stats["disk_blocks_written"] == 0  # nothing new to write: the outputs' blocks are there too


def test_other_settings_and_salts_never_read_the_blocks(tiny, tmp_path, expected):
    run(tiny, tmp_path, PROMPTS[:1])
    _, stats = run(tiny, tmp_path, PROMPTS[:1], dtype="bfloat16")  # another fingerprint: another store
    assert stats["disk_blocks_restored"] == 0 and stats["prefix_cache_hits"] == 0
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    _, stats = run(tiny, tmp_path, PROMPTS[:1], block_size=16)
    assert stats["disk_blocks_restored"] == 0
    salted = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def with_salt():
        async with Engine(tiny, **OPTIONS, disk_cache_dir=str(tmp_path)) as engine:
            done = await engine.complete(PROMPTS[0], salted, cache_salt="tenant-b")
            return done.token_ids, await engine.stats()
    tokens, stats = asyncio.run(with_salt())
    assert tokens == expected[0]
    assert stats["disk_blocks_restored"] > 0 and stats["prefix_cache_hits"] == 0  # there, but not for this salt


@pytest.mark.parametrize("damage", ["flip a bit in a block", "truncate the pool", "flip a journal record",
                                    "cut the journal short"])
def test_damaged_stores_open_and_serve_nothing_damaged(tiny, tmp_path, expected, damage):
    run(tiny, tmp_path, PROMPTS)
    store = store_of(tmp_path)
    records = journal(tmp_path)
    pool, log = store / "pool.bin", store / "journal.bin"
    block_bytes = json.loads((store / "meta.json").read_text())["block_bytes"]
    if damage == "flip a bit in a block":
        slot = records[0][0]
        with open(pool, "r+b") as f:
            f.seek(slot * block_bytes + block_bytes // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x10]))
        dropped = 1
    elif damage == "truncate the pool":
        highest = max(slot for slot, _, _ in records)
        os.truncate(pool, highest * block_bytes + block_bytes // 2)  # the last block written is cut in two
        dropped = 1
    elif damage == "flip a journal record":
        data = bytearray(log.read_bytes())
        data[28 * 2 + 9] ^= 0x01  # the third record's hash
        log.write_bytes(bytes(data))
        dropped = 0
    else:
        os.truncate(log, os.path.getsize(log) - 5)
        dropped = 0
    tokens, stats = run(tiny, tmp_path, PROMPTS)
    assert tokens == expected  # whatever was dropped was recomputed, nothing damaged was served
    assert stats["disk_blocks_corrupt"] == dropped
    assert stats["disk_journal_bad_records"] == 1 - dropped
    # Exactly one block is lost, to its checksum or to its record's.
    assert stats["disk_blocks_restored"] == len({h for _, kind, h in records if kind == 1}) - 1
    assert stats["prefix_cache_hits_disk"] > 0


def test_a_second_engine_on_the_folder_is_refused(tiny, tmp_path):
    async def main():
        async with Engine(tiny, **OPTIONS, disk_cache_dir=str(tmp_path)):
            with pytest.raises(StoreLocked, match=f"in use by another kvmux engine \\(pid {os.getpid()}\\)"):
                async with Engine(tiny, **OPTIONS, disk_cache_dir=str(tmp_path)):
                    pass
    asyncio.run(main())


def test_kill_9_while_writing_leaves_a_store_that_opens(tiny, tmp_path, expected):
    """An engine writing blocks as fast as it can is killed at once after its third prompt: the next one opens
    the store, drops what the kill tore, and serves the rest: at least the blocks of the prompts finished."""
    prompts = PROMPTS + [random_prompt(100 + i, 57) for i in range(200)]
    script = textwrap.dedent(f"""
        import asyncio, sys
        from kvmux import Engine
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from engine_helpers import greedy
        async def main():
            async with Engine({tiny!r}, **{OPTIONS!r}, disk_cache_dir={str(tmp_path)!r}) as engine:
                for i, p in enumerate({prompts!r}):
                    await engine.complete(p, greedy(6))
                    print("done", i, flush=True)
        asyncio.run(main())
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.startswith("done 2"):
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    tokens, stats = run(tiny, tmp_path, PROMPTS)
    assert tokens == expected
    assert stats["prefix_cache_hits_disk"] == 3 * BLOCKS * 8


def test_the_cache_command_shows_and_clears_a_folder(tiny, tmp_path):
    run(tiny, tmp_path, PROMPTS[:1])
    info = subprocess.run([sys.executable, "-m", "kvmux", "cache", "info", str(tmp_path)], capture_output=True,
                          text=True, check=True).stdout
    assert store_of(tmp_path).name in info and "float32" in info and "block_size 8" in info
    cleared = subprocess.run([sys.executable, "-m", "kvmux", "cache", "clear", str(tmp_path)], capture_output=True,
                             text=True, check=True).stdout
    assert "deleted 1 store" in cleared and not [p for p in tmp_path.iterdir() if p.is_dir()]
    _, stats = run(tiny, tmp_path, PROMPTS[:1])
    assert stats["disk_blocks_restored"] == 0


def test_a_prefix_hot_on_the_device_stays_on_a_full_disk(tiny, tmp_path):
    """The disk holds two prompts' blocks. A, B, then A again (a hit on the device, which the disk's journal
    hears of), then C: the disk drops B, not A, and a restart still finds A."""
    a, b, c = PROMPTS
    room = {**OPTIONS, "disk_cache_gib": 16 * 4096 / 2**30}  # 16 blocks of the tiny model's 4 KiB
    _, stats = run(tiny, tmp_path, [a, b, a, c], **room)
    assert stats["disk_blocks_total"] == 16 and stats["prefix_cache_hits_device"] == BLOCKS * 8
    _, stats = run(tiny, tmp_path, [a], **room)
    assert stats["prefix_cache_hits_disk"] == BLOCKS * 8
    _, stats = run(tiny, tmp_path, [b], **room)
    assert stats["prefix_cache_hits_disk"] == 0


def test_the_journal_is_compacted_while_the_engine_runs(tiny, tmp_path, expected, monkeypatch):
    from kvmux.cache.disk_store import DiskStore

    monkeypatch.setattr(DiskStore, "COMPACT_SLACK", 0)  # rewrite it whenever it holds over 4 records a live slot
    run(tiny, tmp_path, PROMPTS * 8)  # rounds 2..8 touch what the first wrote: 147 touches for 21+ blocks
    records = journal(tmp_path)
    assert len(records) <= 4 * len({slot for slot, _, _ in records}) + BLOCKS
    tokens, stats = run(tiny, tmp_path, PROMPTS)
    assert tokens == expected and stats["prefix_cache_hits_disk"] == 3 * BLOCKS * 8


def test_tensor_parallel_ranks_keep_their_slices_across_a_restart(tiny, tmp_path, expected):
    """Each rank stores its slice of every block under DIR/rank-N/; a restart serves the blocks every rank holds
    whole, and a slice torn on one rank costs that block on all of them."""
    tp = dict(tensor_parallel_size=2, threads=1)
    first, stats = run(tiny, tmp_path, PROMPTS, **tp)
    assert first == expected
    again, stats = run(tiny, tmp_path, PROMPTS, **tp)
    assert again == expected
    assert stats["disk_blocks_restored"] >= 3 * BLOCKS and stats["disk_blocks_corrupt"] == 0
    assert stats["prefix_cache_hits_disk"] == 3 * BLOCKS * 8
    rank_store = store_of(tmp_path / "rank-2")
    records = [struct.unpack_from("<IIQ", (rank_store / "journal.bin").read_bytes(), at)
               for at in range(0, (rank_store / "journal.bin").stat().st_size - 27, 28)]
    block_bytes = json.loads((rank_store / "meta.json").read_text())["block_bytes"]
    slot = records[0][0]
    with open(rank_store / "pool.bin", "r+b") as f:
        f.seek(slot * block_bytes + block_bytes // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    restored = stats["disk_blocks_restored"]
    tokens, stats = run(tiny, tmp_path, PROMPTS, **tp)
    assert tokens == expected
    assert stats["disk_blocks_corrupt"] == 1 and stats["disk_blocks_restored"] == restored - 1
    # A single engine on the same folder has other settings (its blocks are whole, not a rank's slice).
    _, stats = run(tiny, tmp_path, PROMPTS[:1])
    assert stats["disk_blocks_restored"] == 0


def test_int8_blocks_are_read_only_under_the_k_mean_they_were_written_with(tiny, tmp_path, monkeypatch):
    """An int8 pool stores K less a calibrated mean: a restart that calibrates the same mean hits the blocks, one
    whose mean came out otherwise (another host's kernels) gets a store of its own."""
    from kvmux.engine import supervisor
    from kvmux.runner import k_mean

    first, _ = run(tiny, tmp_path, PROMPTS, kv_cache_dtype="int8")
    again, stats = run(tiny, tmp_path, PROMPTS, kv_cache_dtype="int8")
    assert again == first and stats["disk_blocks_restored"] >= 3 * BLOCKS and stats["prefix_cache_hits_disk"] > 0
    monkeypatch.setattr(supervisor, "pool_k_mean", lambda model, geometry: k_mean.pool_k_mean(model, geometry) + 1 / 16)
    _, stats = run(tiny, tmp_path, PROMPTS, kv_cache_dtype="int8")
    assert stats["disk_blocks_restored"] == 0 and stats["prefix_cache_hits_disk"] == 0
