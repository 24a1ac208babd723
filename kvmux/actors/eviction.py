"""Eviction: when the running batch outgrows the free blocks, chooses which sequences give theirs up."""
from __future__ import annotations

from kvmux import schema
from kvmux.actors.base import Actor


def choose_victims(candidates: list[schema.Candidate], blocks_short: int) -> list[str]:
    """Lowest priority first, then latest arrival, until enough blocks would be released.

    The newest request has made the least progress, so recomputing it later
    costs the least; the oldest keeps going and is sure to finish.
    """
    order = sorted(candidates, key=lambda c: (c.priority, -c.arrival))
    victims, released = [], 0
    for cand in order:
        if released >= blocks_short:
            break
        victims.append(cand.request_id)
        released += cand.num_blocks
    return victims


class Eviction(Actor):
    name = "eviction"

    def __init__(self, decode: Actor, engine) -> None:
        super().__init__()
        self.decode = decode
        self.engine = engine
        self.preemptions_recompute = 0

    async def handle(self, message) -> None:
        if isinstance(message, schema.Pressure):
            victims = choose_victims(message.candidates, message.blocks_short)
            self.preemptions_recompute += len(victims)
            self.decode.send(schema.PreemptOrder(message.step, victims))
        elif isinstance(message, schema.StatsQuery):
            self.engine.send(schema.StatsReply(message.query_id, self.name, {
                "preemptions": self.preemptions_recompute, "preemptions_recompute": self.preemptions_recompute,
            }))

    def on_error(self, message, exc: Exception) -> None:
        # Decode waits for an answer to every Pressure; an empty order makes it
        # preempt its newest sequence itself rather than hang.
        if isinstance(message, schema.Pressure):
            self.decode.send(schema.PreemptOrder(message.step, []))
