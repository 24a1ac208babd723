"""What one step asks of the forward thread, and what it gives back.

Decode builds a `StepWork` from prefill's plan and its running sequences; the runner (or, under tensor
parallelism, every rank) applies its block copies, runs the forward over its chunks and answers, per sampled
row, the run of `Sampled` tokens it emits: one, or with drafts the accepted ones and one more. Chunks and draws also travel between the actors as messages, so they hold only plain data.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmux.cache.tiers import BlockCopy
from kvmux.sampling import SamplingParams

if TYPE_CHECKING:  # the actors pass these messages without torch ever needing them
    import torch


@dataclass
class Draw:
    """How the token after a chunk is sampled from its logits."""

    params: SamplingParams
    seed: int
    # Which output token of the sample this draw is (0: the first): with the seed, it picks the draw's random
    # stream, so a token does not depend on batch composition or on a preemption in between.
    token_index: int
    # Seeds of further parallel samples that draw their first token from these
    # same logits (the prompt is computed once for all n samples).
    fork_seeds: list[int] = field(default_factory=list)
    # The sample's output tokens so far, which presence and frequency penalties count; empty without penalties.
    output_ids: list[int] = field(default_factory=list)
    # Under structured outputs: the row of StepWork.masks that says which tokens it may draw (its forks' too);
    # with drafts, rows mask_row + j say what may follow the chunk's last token and drafts[:j].
    mask_row: int | None = None
    # Speculative decoding: tokens proposed to follow the sequence, the chunk's last len(drafts) tokens. The
    # forward returns logits for each of them too, and the draw emits the drafts it accepts and one token more.
    drafts: list[int] = field(default_factory=list)


@dataclass
class Chunk:
    """A sequence's share of one step: new tokens from `position` on.

    The one type from prefill's plan through the runner into the forward
    batch: prefill plans the tokens, decode adds the block table and, when the
    chunk's last logits are sampled, the draw.
    """

    seq_id: str
    position: int  # position of token_ids[0]: the sequence's tokens already in the KV cache
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    draw: Draw | None = None
    # With a sliding-window pool: per block, its slot there (-1: none; no query of the chunk sees it).
    sliding_table: list[int] = field(default_factory=list)


@dataclass
class StepWork:
    chunks: list[Chunk]  # each with its block table; those with a draw get a token sampled
    copies: list[BlockCopy] = field(default_factory=list)  # in order, before the forward
    # The token bitmasks of the draws with a mask_row, int32 [rows, ceil(vocab / 32)], bit t of a row set where
    # token t is allowed; or the Future that fills them while the forward runs (the engine process resolves it
    # before a step leaves for tensor-parallel ranks).
    masks: torch.Tensor | Future | None = None
    # Forwards to run back to back, each chunk's sampled token the input of its next (decode chunks only): a step
    # of a few sequences is mostly the engine's own work around the forward, which this spreads over more tokens.
    steps: int = 1


@dataclass
class Sampled:
    """One drawn token; with logprobs asked for, its log-probability and the likeliest alternatives."""

    token: int
    logprob: float | None = None
    # (token id, logprob), likeliest first: as many as asked, fewer when the filters leave fewer tokens.
    top: list[tuple[int, float]] | None = None
