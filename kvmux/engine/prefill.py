"""Prefill: holds waiting sequences, allocates their blocks, and plans prompt chunks under each step's token budget."""
from __future__ import annotations

import bisect
import time

from kvmux.cache.block_manager import BlockManager
from kvmux.engine import messages
from kvmux.engine.actor import Actor
from kvmux.engine.tombstones import Tombstones
from kvmux.step.work import Chunk


class Prefill(Actor):
    name = "prefill"

    def __init__(self, blocks: BlockManager, max_num_seqs: int, watermark_blocks: int, router: Actor) -> None:
        super().__init__()
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.watermark_blocks = watermark_blocks
        self.router = router
        self.decode: Actor | None = None  # wired by the engine (the two actors talk both ways)
        # Not yet started, in scheduling order: priority, then arrival (a
        # preempted sequence keeps its arrival, so it goes before newer ones).
        self.waiting: list[messages.SeqState] = []
        # Blocks allocated, prompt partly computed: seq id -> (seq, tokens computed).
        self.in_progress: dict[str, tuple[messages.SeqState, int]] = {}
        self.tombstones = Tombstones()
        self.prompt_tokens_computed = 0
        self.recomputed_tokens = 0  # of those, tokens a preempted sequence had computed before

    async def handle(self, message) -> None:
        if isinstance(message, (messages.Admitted, messages.Requeue)):
            self._enqueue(message.seq)
        elif isinstance(message, messages.StepRequest):
            self.decode.send(self._plan(message))
        elif isinstance(message, messages.Abort):
            self._abort(message.serial, message.error)
        elif isinstance(message, messages.StepFailed):
            self._fail(message.seq_ids, message.error)
        elif isinstance(message, messages.StatsQuery):
            self.router.send(messages.StatsReply(message.query_id, self.name, {
                "waiting": len(self.waiting), "prefilling": len(self.in_progress),
                "preempted_waiting": sum(1 for s in self.waiting if s.num_preemptions),
                "prompt_tokens_computed": self.prompt_tokens_computed, "recomputed_tokens": self.recomputed_tokens,
            }))

    def on_error(self, message, exc: Exception) -> None:
        if isinstance(message, (messages.Admitted, messages.Requeue)):
            self.router.send(messages.StepOutputs(message.seq.ended(f"{type(exc).__name__}: {exc}")))
        elif isinstance(message, messages.StepRequest):
            # Decode waits for a plan every step: answer with an empty one rather than leave it hanging.
            self.decode.send(messages.StepPlan(message.step, [], [], num_waiting=len(self.waiting) + len(self.in_progress)))

    def _enqueue(self, seq: messages.SeqState) -> None:
        aborted, error = self.tombstones.take(seq.serial, keep=seq.params.n > 1)
        if aborted:
            self.router.send(messages.StepOutputs(seq.ended(error)))
            return
        bisect.insort(self.waiting, seq, key=lambda s: (-s.priority, s.arrival))
        self.decode.send(messages.WorkAvailable())

    def _end(self, held: list[messages.SeqState], error: str | None) -> None:
        """End sequences taken out of waiting / in_progress, giving back the blocks of those that had some."""
        for seq in held:
            if self.in_progress.pop(seq.seq_id, None) is not None:
                self.blocks.free(seq.seq_id)
        gone = {id(s) for s in held}
        self.waiting = [s for s in self.waiting if id(s) not in gone]
        if held:
            self.router.send(messages.StepOutputs([out for seq in held for out in seq.ended(error)]))

    def _abort(self, serial: int, error: str | None) -> None:
        # Several samples of one request may be here (preempted ones come back to be recomputed).
        held = [seq for seq, _ in self.in_progress.values() if seq.serial == serial]
        held += [s for s in self.waiting if s.serial == serial]
        # Another sample may still be on its way here from decode.
        if not held or any(s.params.n > 1 for s in held):
            self.tombstones.add(serial, error)
        self._end(held, error)

    def _fail(self, seq_ids: list[str], error: str) -> None:
        self._end([self.in_progress[seq_id][0] for seq_id in seq_ids if seq_id in self.in_progress], error)

    def _plan(self, req: messages.StepRequest) -> messages.StepPlan:
        budget = req.budget
        chunks: list[Chunk] = []
        handoffs: list[messages.SeqState] = []
        # Sequences already under way go first, so a long prompt advances every
        # step and its blocks are not held idle.
        for seq, done in list(self.in_progress.values()):
            if budget <= 0:
                break
            budget -= self._chunk(seq, done, budget, chunks, handoffs)
        free_seats = self.max_num_seqs - req.num_running - sum(self._seats(s) for s, _ in self.in_progress.values())
        while budget > 0 and self.waiting and free_seats >= self._seats(self.waiting[0]):
            seq = self.waiting[0]
            # Keep the blocks the running batch needs for its next token, and a
            # watermark, unless nothing runs at all (then the whole pool is fair game).
            reserve = req.reserve_blocks + (self.watermark_blocks if req.num_running or self.in_progress else 0)
            if not self.blocks.can_allocate_prompt(seq.token_ids, reserve=reserve, salt=seq.cache_salt):
                break
            # Its prefix is being computed for another sequence: wait for it to be cached.
            if self.blocks.prefix_in_flight(seq.token_ids, salt=seq.cache_salt):
                break
            self.waiting.pop(0)
            try:
                # Leading tokens whose KV is cached are shared, not recomputed.
                cached = self.blocks.allocate(seq.seq_id, seq.token_ids, salt=seq.cache_salt)
            except Exception as exc:  # noqa: BLE001 - this sequence fails, the plan goes on
                self.router.send(messages.StepOutputs(seq.ended(f"allocating KV blocks failed: {exc}")))
                continue
            seq.scheduled = seq.scheduled or time.monotonic()  # a preempted one keeps its first
            free_seats -= self._seats(seq)
            budget -= self._chunk(seq, cached, budget, chunks, handoffs)
        return messages.StepPlan(req.step, chunks, handoffs, num_waiting=len(self.waiting) + len(self.in_progress))

    def _seats(self, seq: messages.SeqState) -> int:
        """Seats a sequence takes: with a sliding-window pool, sized per seat, one per sample it will fork into."""
        return seq.params.n if self.blocks.window and seq.unforked else 1

    def _chunk(self, seq: messages.SeqState, done: int, budget: int, chunks: list, handoffs: list) -> int:
        # At least one prompt token is always computed, so the last chunk has logits to sample from.
        done = min(done, len(seq.token_ids) - 1)
        n = min(budget, len(seq.token_ids) - done)
        chunks.append(Chunk(seq.seq_id, done, seq.token_ids[done:done + n],
                                     self.blocks.block_table(seq.seq_id)))
        self.prompt_tokens_computed += n
        if seq.num_preemptions:  # all but its newest token had been computed when it was preempted
            self.recomputed_tokens += max(0, min(done + n, len(seq.token_ids) - 1) - done)
        if done + n == len(seq.token_ids):
            self.in_progress.pop(seq.seq_id, None)
            handoffs.append(seq)
        else:
            self.in_progress[seq.seq_id] = (seq, done + n)
        return n
