"""Every message the actors exchange, and its msgpack encoding.

Actors talk only through these messages. Each one crosses a queue as msgpack
bytes, so no actor can hold a reference into another's state: a message is a
copy by construction. Dataclasses are tagged with their class name on the wire
and rebuilt on the other side; nothing but these classes can be decoded.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field, fields

import msgpack

from kvmux.sampling import SamplingParams, StructuredOutputs
from kvmux.step.work import Chunk, Draw


@dataclass
class SeqState:
    """A request's sequence as it moves between actors.

    token_ids holds the prompt followed by every token generated so far, so a
    preempted sequence is recomputed by prefilling all of it again.
    """

    request_id: str
    # Unique per admitted request for the engine's whole life, unlike a request
    # id, which may be reused once its request has ended: aborts and tombstones
    # name requests by it.
    serial: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    arrival: float
    priority: int = 0
    # Incremental detokenization: text produced so far, how much of it was
    # streamed, and the token window still being decoded.
    output_text: str = ""
    sent_chars: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    num_preemptions: int = 0
    # Which of the request's params.n parallel samples this is. Sample 0 is
    # the one admitted; the others are forked from it once its prompt is
    # computed, each with its own seed (see sampler.sample_seed).
    index: int = 0
    # Enters the root of the sequence's block hash chain: only requests of the same salt share prefix blocks.
    cache_salt: str | None = None
    scheduled: float = 0.0  # when prefill first gave it blocks (time.monotonic(), as arrival); 0: not yet
    # Under structured outputs: the compiled constraint's key (engine.constraints), which admission holds for it.
    constraint: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def seq_id(self) -> str:
        """The sequence's id in the block manager and in actor state: unique per sample.

        Sample 0 keeps the plain request id; NUL cannot appear in a sensible
        request id, so the others never collide with another request.
        """
        return self.request_id if self.index == 0 else f"{self.request_id}\0{self.index}"

    @property
    def unforked(self) -> bool:
        """A sample 0 that has not sampled yet: the other samples do not exist, it stands for all of them."""
        return self.index == 0 and self.num_output_tokens == 0 and self.params.n > 1

    def ended(self, error: str | None) -> list[SeqOutput]:
        """Final outputs of this sequence ended early (aborted, or failed with `error`): one per sample it
        stands for (all n while unforked)."""
        indices = range(self.params.n) if self.unforked else [self.index]
        return [SeqOutput(self.request_id, [], "", "error" if error else "abort", self.num_prompt_tokens,
                          self.num_output_tokens, error=error, index=i) for i in indices]


# engine -> admission
@dataclass
class Submit:
    """Exactly one of prompt (raw text), prompt_ids or chat (messages for the chat template) is set."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int] | None
    chat: list[dict] | None
    params: SamplingParams
    priority: int
    arrival: float
    cache_salt: str | None = None
    tools: list[dict] | None = None  # with chat: the tools the chat template is given (OpenAI's function format)


@dataclass
class Abort:
    """Cancel a request; with an error set, it ends with finish reason "error".

    From the engine to admission it names the request by id; admission adds
    the serial of the live request of that id before passing it on.
    """

    request_id: str
    serial: int = -1
    error: str | None = None


# admission -> prefill; decode -> prefill (preempted, to recompute)
@dataclass
class Admitted:
    seq: SeqState


@dataclass
class Requeue:
    seq: SeqState


# prefill -> decode: new work is waiting, start stepping if idle
@dataclass
class WorkAvailable:
    pass


# decode -> prefill: the forward of that step failed; the sequences whose chunks were in it
# and that prefill still holds end with the error
@dataclass
class StepFailed:
    step: int
    seq_ids: list[str]
    error: str


# decode -> prefill, once per step: how many prompt tokens this step can take
@dataclass
class StepRequest:
    step: int
    budget: int
    num_running: int
    reserve_blocks: int


@dataclass
class StepPlan:
    step: int
    chunks: list[Chunk]
    # Sequences whose final chunk is in this plan: decode owns them from now on.
    handoffs: list[SeqState]
    num_waiting: int


# decode -> eviction, at the start of a step: the running batch does not fit
# in the free blocks (blocks_short > 0: choose victims), or sequences are
# swapped out (blocks_short <= 0: may some come back?)
@dataclass
class Candidate:
    seq_id: str  # samples of one request are preempted one by one
    arrival: float
    priority: int
    num_blocks: int
    num_tokens: int = 0  # tokens whose KV it holds: what a recompute would prefill again
    num_sliding: int = 0  # sliding-window slots it holds (its window), which a swap copies too


@dataclass
class Pressure:
    step: int
    blocks_short: int
    candidates: list[Candidate]
    # Cost estimates for the auto policy, measured by decode: forward seconds
    # per token fed, and the block copier's bandwidth.
    seconds_per_token: float = 0.0
    copy_bytes_per_s: float = 0.0


@dataclass
class Preemption:
    seq_id: str
    mode: str  # "swap" or "recompute"


@dataclass
class PreemptOrder:
    step: int
    preemptions: list[Preemption] = field(default_factory=list)
    swap_in: list[SeqState] = field(default_factory=list)  # swapped-out sequences to bring back now
    num_swapped: int = 0  # sequences still swapped out after this order
    swapped_blocks: int = 0  # device blocks they need to come back: prefill keeps them free


# decode -> eviction: a victim's KV is on the host now; eviction holds it until it comes back
@dataclass
class Swapped:
    seq: SeqState
    num_blocks: int


# decode -> engine, once per step
@dataclass
class SeqOutput:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    index: int = 0  # which parallel sample
    # Per token of token_ids, when the request asked for logprobs: its log-probability, and its likeliest
    # alternatives as [token id, logprob] pairs (see RequestOutput).
    logprobs: list[float] | None = None
    top_logprobs: list[list[list]] | None = None
    # On sample 0's first token: seconds from arrival until prefill first gave the request blocks.
    queue_s: float | None = None


@dataclass
class StepOutputs:
    outputs: list[SeqOutput]


# engine -> admission: these requests have ended (frees their admission slots)
@dataclass
class Finished:
    request_ids: list[str]


# admission -> engine
@dataclass
class Rejected:
    request_id: str
    code: str
    message: str


@dataclass
class StatsQuery:
    query_id: int


@dataclass
class StatsReply:
    query_id: int
    actor: str
    stats: dict = field(default_factory=dict)


@dataclass
class Shutdown:
    pass


_CLASSES = {cls.__name__: cls for cls in (
    SamplingParams, StructuredOutputs, SeqState, Submit, Abort, Admitted, Requeue, WorkAvailable, StepRequest, Draw, Chunk,
    StepFailed, StepPlan, Candidate, Pressure, Preemption, PreemptOrder, Swapped, SeqOutput, StepOutputs, Finished, Rejected,
    StatsQuery, StatsReply, Shutdown,
)}
_FIELDS = {cls: [f.name for f in fields(cls)] for cls in _CLASSES.values()}
_TAG = "__t"
# Token ids stored compactly, as array("i"): 4 bytes each on the wire and in memory, where a list of Python
# ints takes 36 (admission so stores a request's stop_token_ids).
_TOKEN_ARRAY = 1  # msgpack ext code


def _to_wire(obj):
    if isinstance(obj, array):
        return msgpack.ExtType(_TOKEN_ARRAY, obj.tobytes())
    names = _FIELDS.get(type(obj))
    if names is None:
        if isinstance(obj, int):  # msgpack hands over the integers it cannot pack itself
            raise OverflowError(f"the integer {obj} does not fit in 64 bits")
        raise TypeError(f"cannot encode {type(obj).__name__}: not a kvmux message")
    wire = {name: getattr(obj, name) for name in names}
    wire[_TAG] = type(obj).__name__
    return wire


def _from_wire(wire: dict):
    tag = wire.pop(_TAG, None)
    if tag is None:
        return wire
    return _CLASSES[tag](**wire)


def _ext_from_wire(code: int, data: bytes):
    if code != _TOKEN_ARRAY:
        raise ValueError(f"unknown msgpack ext type {code} in an engine message")
    return array("i", data)


def pack(message) -> bytes:
    return msgpack.packb(message, default=_to_wire, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, object_hook=_from_wire, ext_hook=_ext_from_wire, raw=False, strict_map_key=False)
