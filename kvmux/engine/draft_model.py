"""The draft_model proposer: a smaller model with the target's tokenizer guesses each sequence's next tokens.

It has a KV pool and a block manager of its own, sized as the target's (the same --kv-cache-gib or --num-blocks,
capped at --max-num-seqs full-length sequences): a draft's blocks are smaller than its target's, so it usually
holds whatever the target holds, and a sequence its pool has no room for goes without drafts. A sequence's draft KV follows its tokens:
what the last proposal fed past the tokens verification kept is cut, the rest (at first the whole prompt, less a
prefix the draft's cache holds) is caught up in one chunk, and then each forward drafts one more token for every
sequence still short of its k. Drafts are the draft's argmax, so verification sees each proposed with certainty,
and its rule for that case keeps the target's output exactly, sampled or greedy (runner/sampler.py, verify).

Decode calls it and nothing else does, one call at a time: `propose` on the forward thread (it runs forwards),
`retain` between steps, when no forward runs.
"""
from __future__ import annotations

import logging
import time

import torch

from kvmux.cache.block_manager import BlockManager, OutOfBlocks
from kvmux.cache.kv_cache import PoolGeometry
from kvmux.cache.pool_plan import plan_pool
from kvmux.config import ConfigError
from kvmux.model.loader import LoadedModel, load_model
from kvmux.runner.runner import Runner
from kvmux.sampling import SamplingParams
from kvmux.step.work import Chunk, Draw, StepWork

log = logging.getLogger("kvmux")

_ARGMAX = SamplingParams(temperature=0.0, max_tokens=1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DraftModel:
    def __init__(self, loaded: LoadedModel, runner: Runner, blocks: BlockManager) -> None:
        self.loaded = loaded
        self.runner = runner
        self.blocks = blocks
        self.fed: dict[str, list[int]] = {}  # by seq_id: the tokens whose draft KV exists, drafts fed included
        # Statistics.
        self.forwards = 0
        self.forward_seconds = 0.0
        self.catch_up_tokens = 0  # tokens fed to catch up with sequences (prompts, accepted runs)

    @classmethod
    def load(cls, path: str, target: LoadedModel, *, dtype: torch.dtype, kv_dtype: torch.dtype, device: str,
             attention_backend: str, quantization: str, budget_bytes: int, num_blocks: int | None, block_size: int,
             max_num_seqs: int, max_model_len: int, enable_prefix_caching: bool) -> DraftModel:
        """Load the draft and give it a pool as plan_pool sizes the target's; ConfigError where its tokenizer is
        not the target's (its token ids would mean other text)."""
        loaded = load_model(path, dtype, device, attention_backend=attention_backend, quantization=quantization)
        problem = tokenizer_mismatch(loaded, target)
        if problem:
            raise ConfigError("speculative_config", f"model {path} cannot draft for {target.name}: {problem}")
        arch = loaded.config
        # One pool for every layer, whatever the draft's layers attend over: its windows are the kernels' business.
        pool = plan_pool(PoolGeometry(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, block_size,
                                      kv_dtype), budget_bytes=budget_bytes, num_blocks=num_blocks,
                         max_num_seqs=max_num_seqs, max_model_len=max_model_len)
        runner = Runner.build(loaded.model, pool, 0, 0, {}, device)
        blocks = BlockManager(pool.num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                              cache_key=b"draft\0" + str(loaded.path).encode())
        log.info("draft model %s: %d KV blocks of %d bytes", loaded.name, pool.num_blocks, pool.geometry.block_bytes)
        return cls(loaded, runner, blocks)

    def propose(self, requests: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        """Up to k draft tokens for each (seq_id, tokens, k); a sequence the draft's pool has no room for gets
        none. On a failure the draft forgets every sequence (its KV is rebuilt), then the error goes on."""
        try:
            return self._propose(requests)
        except Exception:
            self.retain(())
            raise

    def _propose(self, requests: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        want = {seq_id: k for seq_id, _, k in requests}
        drafts: dict[str, list[int]] = {seq_id: [] for seq_id in want}
        chunks = [c for c in (self._catch_up(seq_id, tokens) for seq_id, tokens, _ in requests) if c is not None]
        self.catch_up_tokens += sum(len(c.token_ids) for c in chunks)
        confirmed = {seq_id: len(tokens) for seq_id, tokens, _ in requests}
        while chunks:
            started = time.perf_counter()
            runs = self.runner.execute(StepWork(chunks, copies=self.blocks.take_copies()))
            self.forward_seconds += time.perf_counter() - started
            self.forwards += 1
            following = []
            for chunk, run in zip(chunks, runs):
                seq_id, token = chunk.seq_id, run[0].token
                drafts[seq_id].append(token)
                if len(drafts[seq_id]) == want[seq_id]:
                    continue
                try:
                    self.blocks.append_slots(seq_id, [token])
                except OutOfBlocks:
                    continue  # the drafts so far
                self.fed[seq_id].append(token)
                following.append(self._chunk(seq_id, chunk.position + len(chunk.token_ids), [token]))
            chunks = following
        for seq_id, n in confirmed.items():
            if seq_id in self.fed:  # its prompt and accepted tokens: offered to the draft's prefix cache
                self.blocks.mark_computed(seq_id, n)
        return {seq_id: d for seq_id, d in drafts.items() if d}

    def _catch_up(self, seq_id: str, tokens: list[int]) -> Chunk | None:
        """The chunk that brings the sequence's draft KV up to `tokens` (its last token always among it, for the
        logits the first draft comes from); None where the pool has no room."""
        fed = self.fed.get(seq_id)
        try:
            if fed is None:
                start = min(self.blocks.allocate(seq_id, tokens), len(tokens) - 1)
            else:
                start = min(common_prefix(fed, tokens), len(tokens) - 1)
                self.blocks.truncate(seq_id, start)
                self.blocks.append_slots(seq_id, tokens[start:])
        except OutOfBlocks:
            self._forget(seq_id)
            return None
        self.fed[seq_id] = list(tokens)
        return self._chunk(seq_id, start, tokens[start:])

    def _chunk(self, seq_id: str, position: int, token_ids: list[int]) -> Chunk:
        return Chunk(seq_id, position, token_ids, block_table=self.blocks.block_table(seq_id),
                     draw=Draw(_ARGMAX, seed=0, token_index=0))

    def _forget(self, seq_id: str) -> None:
        if self.blocks.has(seq_id):
            self.blocks.free(seq_id)
        self.fed.pop(seq_id, None)

    def retain(self, seq_ids) -> None:
        """Free the draft KV of sequences no longer running (rebuilt from their tokens if they return)."""
        for seq_id in self.fed.keys() - set(seq_ids):
            self._forget(seq_id)

    def stats(self) -> dict:
        return {"spec_draft_forwards": self.forwards, "spec_draft_forward_seconds": self.forward_seconds,
                "spec_draft_catch_up_tokens": self.catch_up_tokens, "spec_draft_blocks_used": self.blocks.num_used}


def tokenizer_mismatch(draft: LoadedModel, target: LoadedModel) -> str | None:
    """Why the draft's token ids would not mean the target's text; None where they do."""
    theirs, ours = draft.tokenizer.backend.get_vocab(), target.tokenizer.backend.get_vocab()
    if theirs != ours:
        differ = sum(ours.get(t) != i for t, i in theirs.items()) + len(ours.keys() - theirs.keys())
        return f"its tokenizer differs ({len(theirs)} tokens against {len(ours)}, {differ} mapped differently)"
    if draft.config.vocab_size > target.config.vocab_size:
        return (f"its vocabulary of {draft.config.vocab_size} ids outgrows the target's "
                f"{target.config.vocab_size}")
    return None
