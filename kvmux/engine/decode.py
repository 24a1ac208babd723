"""Decode: owns the step loop and the running sequences.

Each step is one forward over a mixed batch: one token for every running
sequence plus the prompt chunks prefill planned for it. Then the new tokens are
sampled, detokenized, checked against the stop conditions and streamed in one
message; finished sequences give their blocks back at once, so waiting ones can
join at the very next step (continuous batching).

With speculative decoding a running sequence's token comes with draft tokens
(engine/speculation.py): they take slots like any token, from the blocks left
free once prefill has planned and out of the step's token budget, and the
forward verifies them all. The slots of rejected drafts are taken back right
after it, and only accepted tokens' blocks reach the prefix cache.

Under pressure decode asks eviction for victims and carries its order out:
a victim's blocks are swapped out to the host pool (eviction then holds the
sequence) or dropped (prefill recomputes it). While sequences are swapped out,
each step asks eviction whether some may come back.

While nothing waits for prefill, a plain decode step (no drafts, structured outputs or unforked samples) runs
up to `num_scheduler_steps` forwards in one call to the forward thread, each sequence's sampled token the input of
its next; its slots are taken up front (sliding-window slots too) and named once the tokens are known. At a few
sequences most of a step is this actor's own work around the forward (the plan, the messages, the hand-offs
between threads), which this spreads over several tokens. A sequence that ends inside the run drops the tokens
after its end, and a request that arrives meanwhile waits for the run to end.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import replace

from kvmux.cache.block_manager import BlockManager
from kvmux.engine import messages
from kvmux.engine.actor import Actor, log
from kvmux.engine.constraints import Constraints
from kvmux.engine.detokenize import detokenize_step
from kvmux.engine.speculation import Speculator
from kvmux.engine.tombstones import Tombstones
from kvmux.runner.runner import Runner
from kvmux.runner.sampler import sample_seed
from kvmux.step.work import Chunk, Draw, Sampled, StepWork


class Decode(Actor):
    name = "decode"

    def __init__(self, blocks: BlockManager, runner: Runner, executor: Executor, tokenizer, eos_ids: set[int],
                 max_num_batched_tokens: int, prefill: Actor, eviction: Actor, router: Actor,
                 constraints: Constraints, speculator: Speculator | None = None, num_scheduler_steps: int = 1) -> None:
        super().__init__()
        self.blocks = blocks
        self.runner = runner
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill = prefill
        self.eviction = eviction
        self.router = router
        self.constraints = constraints
        self.speculator = speculator
        self.num_scheduler_steps = num_scheduler_steps
        self.running: dict[str, messages.SeqState] = {}  # by seq_id: each parallel sample runs on its own
        self.prefill_ready = False
        self.stopping = False
        self.tombstones = Tombstones()
        self.step = 0
        self.forwards = 0
        self.plan: messages.StepPlan | None = None  # this step's plan from prefill, while the step runs
        self.deferred: list = []  # messages that arrived during the forward, handled after the step
        # Statistics.
        self.output_tokens = 0
        self.forward_seconds = 0.0
        self.step_seconds = 0.0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self.tokens_forwarded = 0
        self.preemptions_swap = 0
        self.preemptions_recompute = 0
        # Sequences eviction holds swapped out, and the blocks they need to
        # come back, as of its last order: prefill leaves those blocks free.
        self.swapped_out = 0
        self.swapped_blocks = 0

    async def run(self) -> None:
        while True:
            for message in self.deferred:  # those that arrived during the last forward, in order
                self._dispatch(message)
            self.deferred.clear()
            # A Shutdown deferred during the last forward has been handled by now: do not wait for another.
            if not self.stopping and not self.running and not self.prefill_ready and not self.swapped_out:
                self._dispatch(await self.receive())
            while not self.inbox.empty():
                self._dispatch(self.receive_nowait())
            if self.stopping:
                return
            if self.running or self.prefill_ready or self.swapped_out:
                self.plan = None
                try:
                    await self._step()
                except Exception as exc:  # noqa: BLE001 - a broken step fails its sequences, not the engine
                    log.exception("decode step %d failed", self.step)
                    self._fail_batch(self.plan, f"internal error: {type(exc).__name__}: {exc}")

    # -- messages ----------------------------------------------------------

    def _dispatch(self, message) -> None:
        if isinstance(message, messages.WorkAvailable):
            self.prefill_ready = True
        elif isinstance(message, messages.Abort):
            self._abort(message.serial, message.error)
            if self.swapped_out:  # a sample of it may be swapped out
                self.eviction.send(message)
        elif isinstance(message, messages.StatsQuery):
            self.router.send(messages.StatsReply(message.query_id, self.name, self._stats()))
        elif isinstance(message, messages.Shutdown):
            self.stopping = True
        else:
            log.warning("decode ignored an unexpected %s", type(message).__name__)

    async def _await_forward(self, forward: asyncio.Future) -> list[Sampled]:
        """The forward's sampled tokens. Statistics queries are answered meanwhile, so `stats()` never waits
        for a step; every other message is deferred to the step's end, when the state it acts on is settled."""
        getter = None
        try:
            while not forward.done():
                getter = asyncio.ensure_future(self.inbox.get())
                await asyncio.wait((forward, getter), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    break  # the forward is done; the queued message stays in the inbox
                message = messages.unpack(getter.result())
                if isinstance(message, messages.StatsQuery):
                    self._dispatch(message)
                else:
                    self.deferred.append(message)
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
        return forward.result()

    async def _reply(self, kind: type, step: int):
        """Wait for the answer to this step's request, serving other messages meanwhile."""
        while True:
            message = await self.receive()
            if isinstance(message, kind) and message.step == step:
                return message
            self._dispatch(message)

    def _abort(self, serial: int, error: str | None) -> None:
        held = [seq for seq in self.running.values() if seq.serial == serial]
        # Another sample of it may be on its way here from prefill.
        if not held or any(s.params.n > 1 for s in held):
            self.tombstones.add(serial, error)
        for seq in held:
            del self.running[seq.seq_id]
            self.blocks.free(seq.seq_id)
        self._retain()
        if held:
            self.router.send(messages.StepOutputs([out for seq in held for out in seq.ended(error)]))

    def _retain(self) -> None:
        """Drop the per-sequence state of the structured outputs and the speculator for sequences not running."""
        self.constraints.retain(self.running)
        if self.speculator is not None:
            self.speculator.retain(self.running)

    # -- the step ----------------------------------------------------------

    async def _step(self) -> None:
        started = time.perf_counter()
        self.step += 1
        step = self.step
        emitted = self.output_tokens
        reserve = await self._make_room(step)
        drafts = await self._propose()

        budget = self.max_num_batched_tokens - len(self.running) - sum(map(len, drafts.values()))
        # Swapped-out sequences keep their seats where they keep windows: the sliding pool is sized per seat.
        seated = len(self.running) + (self.swapped_out if self.blocks.window else 0)
        if self.prefill_ready:
            self.prefill.send(messages.StepRequest(step, budget, seated, reserve + self.swapped_blocks))
            plan = self.plan = await self._reply(messages.StepPlan, step)
        else:  # prefill holds nothing (it says WorkAvailable when it does): no round trip for an empty plan
            plan = self.plan = messages.StepPlan(step, [], [], num_waiting=0)
        self.prefill_ready = plan.num_waiting > 0
        outputs = self._drop_aborted(plan)
        # An abort handled while waiting for the plan took its sequence out of `running`, drafts and all.
        drafts = {seq_id: d for seq_id, d in drafts.items() if seq_id in self.running}
        steps = self._steps(plan, drafts)
        work, sampled, computed = self._build(plan, drafts, steps)
        if not work.chunks and not self.running and self.swapped_out:
            await asyncio.sleep(0.001)  # waiting for swapped sequences to fit: do not spin
        if work.chunks:
            work.copies = self.blocks.take_copies()
            self.tokens_forwarded += steps * sum(len(c.token_ids) for c in work.chunks)
            self.forwards += steps
            try:
                t0 = time.perf_counter()
                tokens = await self._await_forward(
                    asyncio.get_running_loop().run_in_executor(self.executor, self.runner.execute, work))
                self.forward_seconds += time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its batch, not the engine
                log.exception("forward failed at step %d", step)
                self._fail_batch(plan, f"forward failed: {type(exc).__name__}: {exc}")
                return
            # The step's KV now exists: only from here on may other sequences find it in the prefix cache.
            for seq_id, num_tokens in computed:
                self.blocks.mark_computed(seq_id, num_tokens)
            runs = iter(tokens)
            for seq in sampled:
                run = next(runs)
                if seq.seq_id in drafts:
                    self._settle_drafts(seq, len(drafts[seq.seq_id]), len(run) - 1)
                elif steps > 1:
                    self._settle_steps(seq, run)
                if seq.unforked:
                    outputs += self._fork(seq, runs)
                outputs.append(self._advance_run(seq, run))
        self._retain()
        if outputs:
            self.router.send(messages.StepOutputs(outputs))
        now = time.perf_counter()
        emitted = self.output_tokens - emitted
        self.step_seconds += now - started
        self.recent.append((now, emitted))
        while self.recent and self.recent[0][0] < now - 10.0:
            self.recent.popleft()

    async def _make_room(self, step: int) -> int:
        """Preempt sequences until every running one has a slot for its next token, and bring
        swapped-out ones back when eviction says they fit; returns the blocks the next tokens take."""
        asked_back = False
        while True:
            need = sum(self.blocks.blocks_needed_to_append(seq_id, 1) for seq_id in self.running)
            short = need - self.blocks.num_free
            if short <= 0 and (asked_back or not self.swapped_out):
                return need
            asked_back |= short <= 0
            candidates = [messages.Candidate(seq_id, s.arrival, s.priority, len(self.blocks.block_table(seq_id)),
                                             self.blocks.num_tokens(seq_id), self.blocks.num_sliding_held(seq_id))
                          for seq_id, s in self.running.items()]
            per_token = self.forward_seconds / self.tokens_forwarded if self.tokens_forwarded else 0.0
            self.eviction.send(messages.Pressure(step, short, candidates, per_token, self.runner.copy_bytes_per_s()))
            order = await self._reply(messages.PreemptOrder, step)
            self.swapped_out, self.swapped_blocks = order.num_swapped, order.swapped_blocks
            self._swap_in(order.swap_in)
            if short > 0:
                asked_back = True  # nothing comes back in the step that had to preempt
                preemptions = [p for p in order.preemptions if p.seq_id in self.running] \
                    or [messages.Preemption(next(reversed(self.running)), "recompute")]
                for p in preemptions:
                    self._preempt(p.seq_id, p.mode)

    def _preempt(self, seq_id: str, mode: str) -> None:
        seq = self.running.pop(seq_id)
        seq.num_preemptions += 1
        num_blocks = len(self.blocks.block_table(seq_id))
        if mode == "swap" and self.blocks.swap_out(seq_id):
            self.preemptions_swap += 1
            self.swapped_out += 1
            self.swapped_blocks += num_blocks + 1
            self.eviction.send(messages.Swapped(seq, num_blocks))
            return
        # Recompute (or the host pool is full). With prefix caching its
        # computed blocks stay cached, so the recompute mostly hits them.
        self.preemptions_recompute += 1
        self.blocks.free(seq_id)
        self.prefill.send(messages.Requeue(seq))

    def _swap_in(self, seqs: list[messages.SeqState]) -> None:
        outputs = []
        for seq in seqs:
            aborted, error = self.tombstones.take(seq.serial, keep=seq.params.n > 1)
            if aborted:
                self.blocks.drop_swapped(seq.seq_id)
                outputs += seq.ended(error)
                continue
            try:
                self.blocks.swap_in(seq.seq_id)
            except Exception as exc:  # noqa: BLE001 - eviction misjudged the room: it stays swapped out
                log.warning("swapping %s back in failed (%s); it waits", seq.seq_id, exc)
                self.swapped_out += 1
                self.eviction.send(messages.Swapped(seq, self.blocks.num_swapped_blocks(seq.seq_id)))
                continue
            self.running[seq.seq_id] = seq
        if outputs:
            self.router.send(messages.StepOutputs(outputs))

    def _drop_aborted(self, plan: messages.StepPlan) -> list[messages.SeqOutput]:
        """End hand-offs whose abort overtook them; their chunks are not computed."""
        outputs = []
        for seq in list(plan.handoffs):
            aborted, error = self.tombstones.take(seq.serial, keep=seq.params.n > 1)
            if aborted:
                self.blocks.free(seq.seq_id)
                plan.handoffs.remove(seq)
                plan.chunks = [c for c in plan.chunks if c.seq_id != seq.seq_id]
                outputs += seq.ended(error)
        return outputs

    async def _propose(self) -> dict[str, list[int]]:
        """Draft tokens for the running sequences this step, by seq_id (none where nothing is proposed)."""
        if self.speculator is None or not self.running or not self.speculator.active(len(self.running)):
            return {}
        budget = self.max_num_batched_tokens - len(self.running)  # drafts never crowd out a running token
        requests = []
        for seq_id, seq in self.running.items():
            # Never past max_tokens: the tokens a step emits are its accepted drafts and one more.
            k = self.speculator.wanted(seq_id, min(budget, seq.params.max_tokens - seq.num_output_tokens - 1))
            if k:
                requests.append((seq_id, seq.token_ids, k))
                budget -= k
        if not requests:
            return {}
        if self.speculator.draft is None:
            proposals = self.speculator.propose(requests)
        else:  # forwards of the draft model: on the forward thread, like the step's own
            proposals = await self._await_forward(
                asyncio.get_running_loop().run_in_executor(self.executor, self.speculator.propose, requests))
        drafts = {}
        for seq_id, proposal in proposals.items():
            seq = self.running.get(seq_id)
            if seq is not None and seq.constraint is not None:  # only drafts the constraint allows: each has a mask
                matcher = self.constraints.matcher(seq_id, seq.constraint, seq.token_ids[seq.num_prompt_tokens:])
                proposal = proposal[:matcher.validate_tokens(proposal)]
            if proposal:
                drafts[seq_id] = proposal
        if drafts:
            self.speculator.steps += 1
        return drafts

    def _settle_drafts(self, seq: messages.SeqState, proposed: int, accepted: int) -> None:
        """After the forward: give back the slots of rejected drafts, and offer the accepted ones' full blocks
        to the prefix cache (the sequence's tokens do not include the run yet)."""
        kept = len(seq.token_ids) + accepted  # KV exists for the last token and the accepted drafts
        self.blocks.truncate(seq.seq_id, kept)
        self.blocks.mark_computed(seq.seq_id, kept)
        self.speculator.verified(seq.seq_id, proposed, accepted)

    def _steps(self, plan: messages.StepPlan, drafts: dict[str, list[int]]) -> int:
        """Forwards this step runs: more than one only for a plain decode step while nothing waits for prefill,
        never past a sequence's max_tokens, and only where every sequence's slots for them are free already
        (blocks that hold no cached prefix: a sequence that ends early gives its slots back unused). A
        sliding-window pool's slots for them come from the sequences' seats, as any chunk's do: taking one may
        reclaim a cached slot (demoted where there is a host tier)."""
        steps = self.num_scheduler_steps
        if steps == 1 or plan.chunks or drafts or self.prefill_ready or self.swapped_out:
            return 1
        for seq in self.running.values():
            if seq.constraint is not None or seq.unforked:
                return 1
            steps = min(steps, seq.params.max_tokens - seq.num_output_tokens)
        if steps <= 1:
            return 1
        need = sum(self.blocks.blocks_needed_to_append(seq_id, steps) for seq_id in self.running)
        return steps if need <= self.blocks.num_uncached_free else 1

    def _settle_steps(self, seq: messages.SeqState, run: list[Sampled]) -> None:
        """After a step of several forwards: the slots taken for its tokens get their ids, and the full blocks
        of those whose KV was written may be cached (the sequence's tokens do not include the run yet)."""
        known = len(seq.token_ids)
        self.blocks.fill_tokens(seq.seq_id, known, [s.token for s in run[:-1]])
        self.blocks.mark_computed(seq.seq_id, known + len(run) - 1)

    def _build(self, plan: messages.StepPlan, drafts: dict[str, list[int]], steps: int
               ) -> tuple[StepWork, list[messages.SeqState], list[tuple[str, int]]]:
        """The forward's chunks, the sequences that get a token sampled (in logits order),
        and (seq_id, tokens whose KV exists after the forward) for the prefix cache.

        Drafts get slots from the blocks still free after every running sequence's token has one, and only from
        blocks that hold no cached prefix (a draft's slot is given back within the step: it must not cost a
        prefix); a draft that finds none is dropped (from `drafts` too)."""
        chunks: list[Chunk] = []
        sampled: list[messages.SeqState] = []
        computed: list[tuple[str, int]] = []
        masked: list = []  # (matcher, drafts) of the draws under structured outputs, in mask_row order
        for seq_id, seq in self.running.items():  # with several forwards, slots for tokens yet to be sampled
            self.blocks.append_slots(seq_id, seq.token_ids[-1:] + [-1] * (steps - 1))
        for seq_id, proposal in list(drafts.items()):
            fits = len(proposal)
            while fits and self.blocks.blocks_needed_to_append(seq_id, fits) > self.blocks.num_uncached_free:
                fits -= 1
            if fits:
                drafts[seq_id] = proposal[:fits]
                self.blocks.append_slots(seq_id, drafts[seq_id])
            else:
                del drafts[seq_id]
        for seq_id, seq in self.running.items():
            proposal = drafts.get(seq_id, [])
            chunk = Chunk(seq_id, len(seq.token_ids) - 1, seq.token_ids[-1:] + proposal)
            chunks.append(self._sampled_chunk(seq, chunk, masked, proposal))
            sampled.append(seq)
            computed.append((seq_id, len(seq.token_ids)))
        finishing = {s.seq_id: s for s in plan.handoffs}
        for chunk in plan.chunks:
            seq = finishing.get(chunk.seq_id)
            if seq is None:
                if not self.blocks.has(chunk.seq_id):
                    continue  # aborted in prefill since it planned the chunk: its blocks are gone
                chunks.append(chunk)
            else:
                chunks.append(self._sampled_chunk(seq, chunk, masked, []))
                sampled.append(seq)
                self.running[seq.seq_id] = seq
            computed.append((chunk.seq_id, chunk.position + len(chunk.token_ids)))
        if self.blocks.window:  # the sliding-window layers' slots: the chunk's blocks and the window before them
            for chunk in chunks:  # with several forwards, the blocks the later ones write too
                chunk.sliding_table = self.blocks.sliding_table(chunk.seq_id, chunk.position,
                                                                chunk.position + len(chunk.token_ids) + steps - 1)
        # The masks are filled on another thread while the forward runs; sampling waits for them.
        work = StepWork(chunks, masks=self.constraints.fill(masked) if masked else None, steps=steps)
        return work, sampled, computed

    def _sampled_chunk(self, seq: messages.SeqState, chunk: Chunk, masked: list, drafts: list[int]) -> Chunk:
        """The chunk with its sequence's block table and draw. An unforked sample 0 draws the first
        tokens of all n samples from its logits (all under one mask: their outputs are empty alike)."""
        forks = [sample_seed(seq.seed, i) for i in range(1, seq.params.n)] if seq.unforked else []
        chunk.block_table = self.blocks.block_table(seq.seq_id)
        history = seq.token_ids[seq.num_prompt_tokens:] if seq.params.penalized else []
        chunk.draw = Draw(seq.params, seq.seed, seq.num_output_tokens, forks, history, drafts=drafts)
        if seq.constraint is not None:
            chunk.draw.mask_row = sum(1 + len(d) for _, d in masked)
            masked.append((self.constraints.matcher(seq.seq_id, seq.constraint,
                                                    seq.token_ids[seq.num_prompt_tokens:]), drafts))
        return chunk

    def _fork(self, seq: messages.SeqState, runs) -> list[messages.SeqOutput]:
        """Start samples 1..n-1 of a request: each shares every prompt block of sample 0.

        Called before sample 0 takes its own first token, so the samples share
        the prompt exactly; the partly filled last block is copied on the first
        write into it (copy-on-write in append_slots).
        """
        outputs = []
        for i in range(1, seq.params.n):
            child = replace(seq, index=i, seed=sample_seed(seq.seed, i), token_ids=list(seq.token_ids))
            self.blocks.fork(seq.seq_id, child.seq_id)
            self.running[child.seq_id] = child
            outputs.append(self._advance_run(child, next(runs)))
        return outputs

    def _fail_batch(self, plan: messages.StepPlan | None, error: str) -> None:
        """End every sequence of the step with an error: running ones, hand-offs, and (through prefill) the rest."""
        outputs = []
        for seq_id in list(self.running):
            seq = self.running.pop(seq_id)
            self.blocks.free(seq_id)
            outputs += seq.ended(error)
        handoffs = plan.handoffs if plan else []
        for seq in handoffs:  # those not yet moved into running
            if self.blocks.has(seq.seq_id):
                self.blocks.free(seq.seq_id)
                outputs += seq.ended(error)
        self._retain()
        self.router.send(messages.StepOutputs(outputs))
        finishing = {s.seq_id for s in handoffs}
        unfinished = [c.seq_id for c in plan.chunks if c.seq_id not in finishing] if plan else []
        if unfinished:
            self.prefill.send(messages.StepFailed(plan.step, unfinished, error))

    def _advance_run(self, seq: messages.SeqState, run: list[Sampled]) -> messages.SeqOutput:
        """Append a step's tokens one by one until one ends the sequence; one output for them all."""
        out = self._advance_or_fail(seq, run[0])
        for drawn in run[1:]:
            if out.finish_reason is not None:
                break
            more = self._advance_or_fail(seq, drawn)
            out.token_ids += more.token_ids
            out.text += more.text
            out.finish_reason, out.num_output_tokens, out.error = more.finish_reason, more.num_output_tokens, more.error
            if out.logprobs is not None:
                out.logprobs += more.logprobs or []
                out.top_logprobs += more.top_logprobs or []
        return out

    def _advance_or_fail(self, seq: messages.SeqState, drawn: Sampled) -> messages.SeqOutput:
        """_advance, but a failure there (the tokenizer raising, say) ends only this sequence."""
        try:
            return self._advance(seq, drawn)
        except Exception as exc:  # noqa: BLE001
            log.exception("finishing a token of %s failed", seq.request_id)
            if self.running.pop(seq.seq_id, None) is not None:
                self.blocks.free(seq.seq_id)
            error = f"{type(exc).__name__}: {exc}"
            return messages.SeqOutput(seq.request_id, [], "", "error", seq.num_prompt_tokens, seq.num_output_tokens,
                                      error=error, index=seq.index)

    def _advance(self, seq: messages.SeqState, drawn: Sampled) -> messages.SeqOutput:
        """Append a sampled token; detokenize; decide whether the sequence is done."""
        params = seq.params
        token = drawn.token
        seq.token_ids.append(token)
        self.output_tokens += 1
        finish = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids):
            finish = "stop"
        elif seq.constraint is not None and self.constraints.matcher(
                seq.seq_id, seq.constraint, seq.token_ids[seq.num_prompt_tokens:]).is_stopped():
            finish = "stop"  # the output is complete: the constraint allows no further token (but end-of-sequence)
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
            del self.running[seq.seq_id]
            self.blocks.free(seq.seq_id)
            if self.speculator is not None:
                self.speculator.finished(seq.token_ids, seq.num_prompt_tokens)
        first = seq.index == 0 and seq.num_output_tokens == 1
        return messages.SeqOutput(
            seq.request_id, [token], delta, finish, seq.num_prompt_tokens, seq.num_output_tokens, index=seq.index,
            logprobs=None if drawn.logprob is None else [drawn.logprob],
            top_logprobs=None if drawn.top is None else [drawn.top],
            queue_s=seq.scheduled - seq.arrival if first else None)

    def _stats(self) -> dict:
        window = sum(n for _, n in self.recent)
        span = (self.recent[-1][0] - self.recent[0][0]) if len(self.recent) > 1 else 0.0
        return {
            "running": len(self.running), "steps": self.step, "forwards": self.forwards,
            "output_tokens": self.output_tokens,
            "tokens_per_s": window / span if span > 0 else 0.0,
            "forward_seconds": self.forward_seconds, "step_seconds": self.step_seconds,
            "preemptions": self.preemptions_swap + self.preemptions_recompute,
            "preemptions_swap": self.preemptions_swap, "preemptions_recompute": self.preemptions_recompute,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }
