"""Prefill: holds waiting sequences, allocates their blocks, and plans prompt chunks under each step's token budget."""
from __future__ import annotations

import bisect

from kvmux.engine import messages as schema
from kvmux.engine.actor import Actor
from kvmux.engine.tombstones import Tombstones
from kvmux.cache.block_manager import BlockManager


def ended(seq: schema.SeqState, error: str | None) -> list[schema.SeqOutput]:
    """Final outputs of a sequence ended early: one per sample it stands for (all n while unforked)."""
    indices = range(seq.params.n) if seq.unforked else [seq.index]
    return [schema.SeqOutput(
        request_id=seq.request_id, token_ids=[], text="", finish_reason="error" if error else "abort",
        num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens, error=error, index=i,
    ) for i in indices]


class Prefill(Actor):
    name = "prefill"

    def __init__(self, blocks: BlockManager, max_num_seqs: int, watermark_blocks: int, engine) -> None:
        super().__init__()
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.watermark_blocks = watermark_blocks
        self.engine = engine
        self.decode: Actor | None = None  # wired by the engine (the two actors talk both ways)
        # Not yet started, in scheduling order: priority, then arrival (a
        # preempted sequence keeps its arrival, so it goes before newer ones).
        self.waiting: list[schema.SeqState] = []
        # Blocks allocated, prompt partly computed: seq id -> (seq, tokens computed).
        self.in_progress: dict[str, tuple[schema.SeqState, int]] = {}
        self.tombstones = Tombstones()
        self.prompt_tokens_computed = 0
        self.recomputed_tokens = 0  # of those, tokens a preempted sequence had computed before

    async def handle(self, message) -> None:
        if isinstance(message, (schema.Admitted, schema.Requeue)):
            self._enqueue(message.seq)
        elif isinstance(message, schema.StepRequest):
            self.decode.send(self._plan(message))
        elif isinstance(message, schema.Abort):
            self._abort(message.request_id, message.error)
        elif isinstance(message, schema.StatsQuery):
            self.engine.send(schema.StatsReply(message.query_id, self.name, {
                "waiting": len(self.waiting), "prefilling": len(self.in_progress),
                "preempted_waiting": sum(1 for s in self.waiting if s.num_preemptions),
                "prompt_tokens_computed": self.prompt_tokens_computed, "recomputed_tokens": self.recomputed_tokens,
            }))

    def on_error(self, message, exc: Exception) -> None:
        if isinstance(message, (schema.Admitted, schema.Requeue)):
            self.engine.send(schema.StepOutputs(ended(message.seq, f"{type(exc).__name__}: {exc}")))
        elif isinstance(message, schema.StepRequest):
            # Decode waits for a plan every step: answer with an empty one rather than leave it hanging.
            self.decode.send(schema.StepPlan(message.step, [], [], num_waiting=len(self.waiting) + len(self.in_progress)))

    def _enqueue(self, seq: schema.SeqState) -> None:
        aborted, error = self.tombstones.take(seq.request_id, keep=seq.params.n > 1)
        if aborted:
            self.engine.send(schema.StepOutputs(ended(seq, error)))
            return
        bisect.insort(self.waiting, seq, key=lambda s: (-s.priority, s.arrival))
        self.decode.send(schema.WorkAvailable())

    def _abort(self, request_id: str, error: str | None) -> None:
        # Several samples of one request may be here (preempted ones come back to be recomputed).
        held = [seq for seq, _ in self.in_progress.values() if seq.request_id == request_id]
        for seq in held:
            del self.in_progress[seq.seq_id]
            self.blocks.free(seq.seq_id)
        waiting = [s for s in self.waiting if s.request_id == request_id]
        self.waiting = [s for s in self.waiting if s.request_id != request_id]
        held += waiting
        # Another sample may still be on its way here from decode.
        if not held or any(s.params.n > 1 for s in held):
            self.tombstones.add(request_id, error)
        if held:
            self.engine.send(schema.StepOutputs([out for seq in held for out in ended(seq, error)]))

    def _plan(self, req: schema.StepRequest) -> schema.StepPlan:
        budget = req.budget
        chunks: list[schema.Chunk] = []
        handoffs: list[schema.SeqState] = []
        # Sequences already under way go first, so a long prompt advances every
        # step and its blocks are not held idle.
        for seq, done in list(self.in_progress.values()):
            if budget <= 0:
                break
            budget -= self._chunk(seq, done, budget, chunks, handoffs)
        free_seats = self.max_num_seqs - req.num_running - len(self.in_progress)
        while budget > 0 and free_seats > 0 and self.waiting:
            seq = self.waiting[0]
            # Keep the blocks the running batch needs for its next token, and a
            # watermark, unless nothing runs at all (then the whole pool is fair game).
            reserve = req.reserve_blocks + (self.watermark_blocks if req.num_running or self.in_progress else 0)
            if not self.blocks.can_allocate_prompt(seq.token_ids, reserve=reserve):
                break
            # Its prefix is being computed for another sequence: wait for it to be cached.
            if self.blocks.prefix_in_flight(seq.token_ids):
                break
            self.waiting.pop(0)
            try:
                # Leading tokens whose KV is cached are shared, not recomputed.
                cached = self.blocks.allocate(seq.seq_id, seq.token_ids)
            except Exception as exc:  # noqa: BLE001 - this sequence fails, the plan goes on
                self.engine.send(schema.StepOutputs(ended(seq, f"allocating KV blocks failed: {exc}")))
                continue
            free_seats -= 1
            budget -= self._chunk(seq, cached, budget, chunks, handoffs)
        return schema.StepPlan(req.step, chunks, handoffs, num_waiting=len(self.waiting) + len(self.in_progress))

    def _chunk(self, seq: schema.SeqState, done: int, budget: int, chunks: list, handoffs: list) -> int:
        # At least one prompt token is always computed, so the last chunk has logits to sample from.
        done = min(done, len(seq.token_ids) - 1)
        n = min(budget, len(seq.token_ids) - done)
        chunks.append(schema.Chunk(seq.seq_id, seq.request_id, done, seq.token_ids[done:done + n]))
        self.prompt_tokens_computed += n
        if seq.num_preemptions:  # all but its newest token had been computed when it was preempted
            self.recomputed_tokens += max(0, min(done + n, len(seq.token_ids) - 1) - done)
        if done + n == len(seq.token_ids):
            self.in_progress.pop(seq.seq_id, None)
            handoffs.append(seq)
        else:
            self.in_progress[seq.seq_id] = (seq, done + n)
        return n
