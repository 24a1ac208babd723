"""Decode: owns the step loop and the running sequences.

Each step is one forward over a mixed batch: one token for every running
sequence plus the prompt chunks prefill planned for it. Then the new tokens are
sampled, detokenized, checked against the stop conditions and streamed in one
message; finished sequences give their blocks back at once, so waiting ones can
join at the very next step (continuous batching).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor

from kvmux import schema
from kvmux.actors.base import Actor, log
from kvmux.actors.prefill import ended
from kvmux.actors.tombstones import Tombstones
from kvmux.block_manager import BlockManager
from kvmux.detokenize import detokenize_step
from kvmux.runner import Runner, SeqWork, StepWork


class _Stop(Exception):
    pass


class Decode(Actor):
    name = "decode"

    def __init__(self, blocks: BlockManager, runner: Runner, executor: Executor, tokenizer, eos_ids: set[int],
                 max_num_batched_tokens: int, prefill: Actor, eviction: Actor, engine) -> None:
        super().__init__()
        self.blocks = blocks
        self.runner = runner
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill = prefill
        self.eviction = eviction
        self.engine = engine
        self.running: dict[str, schema.SeqState] = {}
        self.prefill_ready = False
        self.stopping = False
        self.tombstones = Tombstones()
        self.step = 0
        # Statistics.
        self.output_tokens = 0
        self.forward_seconds = 0.0
        self.step_seconds = 0.0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s

    async def run(self) -> None:
        try:
            while True:
                if not self.running and not self.prefill_ready:
                    self._dispatch(await self.receive())
                while not self.inbox.empty():
                    self._dispatch(self.receive_nowait())
                if self.stopping:
                    return
                if self.running or self.prefill_ready:
                    await self._step()
        except _Stop:
            return

    # -- messages ----------------------------------------------------------

    def _dispatch(self, message) -> None:
        if isinstance(message, schema.WorkAvailable):
            self.prefill_ready = True
        elif isinstance(message, schema.Abort):
            self._abort(message.request_id, message.error)
        elif isinstance(message, schema.StatsQuery):
            self.engine.send(schema.StatsReply(message.query_id, self.name, self._stats()))
        elif isinstance(message, schema.Shutdown):
            self.stopping = True
        else:
            log.warning("decode ignored an unexpected %s", type(message).__name__)

    async def _reply(self, kind: type, step: int):
        """Wait for the answer to this step's request, serving other messages meanwhile."""
        while True:
            message = await self.receive()
            if isinstance(message, kind) and message.step == step:
                return message
            self._dispatch(message)

    def _abort(self, request_id: str, error: str | None) -> None:
        seq = self.running.pop(request_id, None)
        if seq is None:
            self.tombstones.add(request_id, error)
            return
        self.blocks.free(request_id)
        self.engine.send(schema.StepOutputs([ended(seq, error)]))

    # -- the step ----------------------------------------------------------

    async def _step(self) -> None:
        started = time.perf_counter()
        self.step += 1
        step = self.step
        reserve = await self._make_room(step)

        self.prefill.send(schema.StepRequest(step, self.max_num_batched_tokens - len(self.running),
                                             len(self.running), reserve))
        plan = await self._reply(schema.StepPlan, step)
        self.prefill_ready = plan.num_waiting > 0
        outputs = self._drop_aborted(plan)
        work, sampled = self._build(plan)
        if work.seqs:
            try:
                t0 = time.perf_counter()
                tokens = await asyncio.get_running_loop().run_in_executor(self.executor, self.runner.execute, work)
                self.forward_seconds += time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its batch, not the engine
                log.exception("forward failed at step %d", step)
                self._fail_batch(plan, f"forward failed: {type(exc).__name__}: {exc}")
                return
            outputs += [self._advance(seq, token) for seq, token in zip(sampled, tokens)]
        if outputs:
            self.engine.send(schema.StepOutputs(outputs))
        now = time.perf_counter()
        self.step_seconds += now - started
        self.recent.append((now, len(sampled)))
        while self.recent and self.recent[0][0] < now - 10.0:
            self.recent.popleft()

    async def _make_room(self, step: int) -> int:
        """Preempt sequences until every running one has a slot for its next token; returns the blocks that takes."""
        while True:
            need = sum(self.blocks.blocks_needed_to_append(rid, 1) for rid in self.running)
            short = need - self.blocks.num_free
            if short <= 0:
                return need
            candidates = [schema.Candidate(rid, s.arrival, s.priority, len(self.blocks.block_table(rid)))
                          for rid, s in self.running.items()]
            self.eviction.send(schema.Pressure(step, short, candidates))
            order = await self._reply(schema.PreemptOrder, step)
            victims = [v for v in order.victims if v in self.running] or [next(reversed(self.running))]
            for request_id in victims:
                self._preempt(request_id)

    def _preempt(self, request_id: str) -> None:
        seq = self.running.pop(request_id)
        self.blocks.free(request_id)
        seq.num_preemptions += 1
        self.prefill.send(schema.Requeue(seq))

    def _drop_aborted(self, plan: schema.StepPlan) -> list[schema.SeqOutput]:
        """End hand-offs whose abort overtook them; their chunks are not computed."""
        outputs = []
        for seq in list(plan.handoffs):
            aborted, error = self.tombstones.take(seq.request_id)
            if aborted:
                self.blocks.free(seq.request_id)
                plan.handoffs.remove(seq)
                plan.chunks = [c for c in plan.chunks if c.request_id != seq.request_id]
                outputs.append(ended(seq, error))
        return outputs

    def _build(self, plan: schema.StepPlan) -> tuple[StepWork, list[schema.SeqState]]:
        """The forward's inputs, and the sequences that get a token sampled (in logits order)."""
        seqs: list[SeqWork] = []
        sampled: list[schema.SeqState] = []
        copies: list[tuple[int, int]] = []
        for rid, seq in self.running.items():
            last = seq.token_ids[-1]
            copies += self.blocks.append_slots(rid, [last])
            seqs.append(self._seq_work(seq, [last], len(seq.token_ids) - 1))
            sampled.append(seq)
        finishing = {s.request_id: s for s in plan.handoffs}
        for chunk in plan.chunks:
            seq = finishing.get(chunk.request_id)
            if seq is None:
                seqs.append(SeqWork(chunk.token_ids, chunk.start, self.blocks.block_table(chunk.request_id)))
            else:
                seqs.append(self._seq_work(seq, chunk.token_ids, chunk.start))
                sampled.append(seq)
                self.running[seq.request_id] = seq
        return StepWork(seqs, copies), sampled

    def _seq_work(self, seq: schema.SeqState, token_ids: list[int], start: int) -> SeqWork:
        return SeqWork(token_ids, start, self.blocks.block_table(seq.request_id),
                       params=seq.params, seed=seq.seed, step=seq.num_output_tokens)

    def _fail_batch(self, plan: schema.StepPlan, error: str) -> None:
        outputs = []
        for rid in list(self.running):
            seq = self.running.pop(rid)
            self.blocks.free(rid)
            outputs.append(ended(seq, error))
        self.engine.send(schema.StepOutputs(outputs))
        finishing = {s.request_id for s in plan.handoffs}
        for chunk in plan.chunks:
            if chunk.request_id not in finishing:
                self.prefill.send(schema.Abort(chunk.request_id, error))

    def _advance(self, seq: schema.SeqState, token: int) -> schema.SeqOutput:
        """Append a sampled token; detokenize; decide whether the sequence is done."""
        params = seq.params
        seq.token_ids.append(token)
        self.output_tokens += 1
        finish = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids):
            finish = "stop"
        elif seq.num_output_tokens >= params.max_tokens:
            finish = "length"
        text, seq.prefix_offset, seq.read_offset = detokenize_step(
            self.tokenizer, seq.token_ids, seq.prefix_offset, seq.read_offset, final=finish is not None)
        holdback = 0
        if params.stop:
            longest = max(len(s) for s in params.stop)
            search_from = max(0, len(seq.output_text) - longest + 1)
            seq.output_text += text
            hits = [i for i in (seq.output_text.find(s, search_from) for s in params.stop) if i >= 0]
            if hits:
                seq.output_text = seq.output_text[:min(hits)]
                finish = "stop"
            # Text that may be the start of a stop string is held back until it is decided.
            holdback = longest - 1
        else:
            seq.output_text += text
        end = len(seq.output_text) if finish else max(seq.sent_chars, len(seq.output_text) - holdback)
        delta = seq.output_text[seq.sent_chars:end]
        seq.sent_chars = end
        if finish:
            del self.running[seq.request_id]
            self.blocks.free(seq.request_id)
        return schema.SeqOutput(seq.request_id, [token], delta, finish, seq.num_prompt_tokens, seq.num_output_tokens)

    def _stats(self) -> dict:
        window = sum(n for _, n in self.recent)
        span = (self.recent[-1][0] - self.recent[0][0]) if len(self.recent) > 1 else 0.0
        return {
            "running": len(self.running), "steps": self.step, "output_tokens": self.output_tokens,
            "tokens_per_s": window / span if span > 0 else 0.0,
            "forward_seconds": self.forward_seconds, "step_seconds": self.step_seconds,
        }
