"""Eviction: when the running batch outgrows the free blocks, chooses victims and how they give their blocks up;
holds the sequences swapped out to the host pool and decides when they come back.

Watermarks (fractions of the device pool, in blocks here): under pressure,
victims are taken until the free blocks would cover the batch's next tokens
plus the low watermark; a swapped-out sequence comes back only when, after
taking its blocks, the high watermark would still be free. The gap between
the two keeps a sequence from being swapped out and in on alternate steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmux.cache.block_manager import BlockManager
from kvmux.engine import messages
from kvmux.engine.actor import Actor


@dataclass
class Policy:
    mode: str  # swap | recompute | auto
    low_blocks: int
    high_blocks: int
    block_bytes: int  # bytes of one block across all layers of the pool: one swap copy
    sliding_block_bytes: int = 0  # bytes of one slot of the sliding-window layers' pool, if there is one


def choose_victims(candidates: list[messages.Candidate], blocks_short: int) -> list[messages.Candidate]:
    """Lowest priority first, then latest arrival, until enough blocks would be released.

    The newest request has made the least progress, so setting it back costs
    the least; the oldest keeps going and is sure to finish.
    """
    order = sorted(candidates, key=lambda c: (c.priority, -c.arrival))
    victims, released = [], 0
    for cand in order:
        if released >= blocks_short:
            break
        victims.append(cand)
        released += cand.num_blocks
    return victims


def choose_mode(policy: Policy, cand: messages.Candidate, host_free: int, seconds_per_token: float,
                copy_bytes_per_s: float) -> str:
    """swap or recompute: `auto` swaps when copying the blocks out and back is cheaper than prefilling the tokens again.

    The recompute estimate counts every token, though blocks still cached on
    the device when it comes back are not computed again; the swap estimate
    counts both copies. The block manager falls back to recompute anyway when
    the host pool turns out to be full.
    """
    if policy.mode == "recompute" or cand.num_blocks > host_free:
        return "recompute"
    if policy.mode == "swap":
        return "swap"
    swap_bytes = cand.num_blocks * policy.block_bytes + cand.num_sliding * policy.sliding_block_bytes
    swap_s = 2 * swap_bytes / max(copy_bytes_per_s, 1.0)
    recompute_s = cand.num_tokens * seconds_per_token
    return "swap" if swap_s <= recompute_s else "recompute"


class Eviction(Actor):
    name = "eviction"

    def __init__(self, blocks: BlockManager, policy: Policy, router: Actor) -> None:
        super().__init__()
        self.blocks = blocks
        self.policy = policy
        self.decode: Actor | None = None  # wired by the engine (the two actors talk both ways)
        self.router = router
        # Swapped out, by seq_id: the sequence and the device blocks it needs to come back.
        self.swapped: dict[str, tuple[messages.SeqState, int]] = {}
        self.swap_ins = 0

    async def handle(self, message) -> None:
        if isinstance(message, messages.Pressure):
            self.decode.send(self._order(message))
        elif isinstance(message, messages.Swapped):
            self.swapped[message.seq.seq_id] = (message.seq, message.num_blocks)
        elif isinstance(message, messages.Abort):
            self._abort(message.serial, message.error)
        elif isinstance(message, messages.StatsQuery):
            self.router.send(messages.StatsReply(message.query_id, self.name, {
                "swapped": len(self.swapped), "swap_ins": self.swap_ins,
            }))

    def on_error(self, message, exc: Exception) -> None:
        # Decode waits for an answer to every Pressure; an empty order makes it
        # preempt its newest sequence itself (by recompute) rather than hang.
        if isinstance(message, messages.Pressure):
            self.decode.send(messages.PreemptOrder(message.step, num_swapped=len(self.swapped),
                                                   swapped_blocks=self._swapped_blocks()))

    def _order(self, p: messages.Pressure) -> messages.PreemptOrder:
        preemptions, back = [], []
        if p.blocks_short > 0:
            host_free = self.blocks.tiers.host.num_free
            for cand in choose_victims(p.candidates, p.blocks_short + self.policy.low_blocks):
                mode = choose_mode(self.policy, cand, host_free, p.seconds_per_token, p.copy_bytes_per_s)
                host_free -= cand.num_blocks if mode == "swap" else 0
                preemptions.append(messages.Preemption(cand.seq_id, mode))
        else:
            back = self._swap_ins(-p.blocks_short, bool(p.candidates))
        return messages.PreemptOrder(p.step, preemptions, back, num_swapped=len(self.swapped),
                                     swapped_blocks=self._swapped_blocks())

    def _swap_ins(self, spare: int, running: bool) -> list[messages.SeqState]:
        """Highest priority, then earliest arrival first, while each fits above the high watermark.

        Stops at the first that does not fit, so a large sequence is not
        overtaken forever by smaller ones. With nothing running the whole
        pool is fair game.
        """
        if running:
            spare -= self.policy.high_blocks
        back = []
        for seq_id, (seq, num_blocks) in sorted(self.swapped.items(), key=lambda kv: (-kv[1][0].priority,
                                                                                      kv[1][0].arrival)):
            need = num_blocks + 1  # and a slot for its next token
            if need > spare:
                break
            spare -= need
            back.append(seq)
            del self.swapped[seq_id]
        self.swap_ins += len(back)
        return back

    def _swapped_blocks(self) -> int:
        return sum(n + 1 for _, n in self.swapped.values())

    def _abort(self, serial: int, error: str | None) -> None:
        # Decode forwards aborts here while it has sequences swapped out; a
        # sequence already sent back is ended by decode's tombstone instead.
        held = [seq for seq, _ in self.swapped.values() if seq.serial == serial]
        for seq in held:
            del self.swapped[seq.seq_id]
            self.blocks.drop_swapped(seq.seq_id)
        if held:
            self.router.send(messages.StepOutputs([out for seq in held for out in seq.ended(error)]))
