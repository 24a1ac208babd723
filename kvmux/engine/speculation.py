"""Speculative decoding's policy: which running sequences get draft tokens in a step, how many, and its counters.

Decode asks how many drafts each running sequence should get (`wanted`), then for the drafts of them all
(`propose`: an n-gram lookup on the event loop, or, with a draft model, forwards of that model on the forward
thread), verifies them in the step's one forward and reports what was accepted (`verified`). A sequence's number of drafts follows its recent acceptance: one more than the mean
run it accepted lately (an exponential average), between 1 and num_speculative_tokens, so a sequence whose
drafts keep failing costs one token per step, and one copying its prompt proposes the most. A step with more
running sequences than `max_batch` has no drafts at all: its forward is no longer bound by reading the weights,
so the rows of rejected drafts cost real time (docs/benchmarks.md, "Speculative decoding", measures where).
"""
from __future__ import annotations

from kvmux.config import SpeculativeConfig
from kvmux.engine.draft_model import DraftModel
from kvmux.engine.proposers import NgramIndex, SuffixCache

_DECAY = 0.5  # weight of the past in a sequence's mean accepted run


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft: DraftModel | None = None) -> None:
        self.config = config
        self.draft = draft  # the draft_model method's model; None for the lookups
        self.indexes: dict[str, NgramIndex] = {}  # by seq_id: its own prompt and output
        self.accepting: dict[str, float] = {}  # by seq_id: its mean accepted run, lately
        self.suffix = SuffixCache(config.prompt_lookup_min, config.prompt_lookup_max, config.suffix_cache_tokens) \
            if config.method == "suffix" else None
        # Statistics.
        self.proposed = 0  # draft tokens proposed
        self.accepted = 0  # of those, accepted
        self.draws = 0  # draws with drafts, verified
        self.steps = 0  # steps with drafts
        self.steps_skipped = 0  # steps the batch was too large for

    def active(self, num_running: int) -> bool:
        """Whether a step with this many running sequences speculates."""
        if num_running > self.config.max_batch:
            self.steps_skipped += 1
            return False
        return True

    def wanted(self, seq_id: str, most: int) -> int:
        """How many drafts the sequence gets this step (0: none), at most `most`."""
        mean = self.accepting.get(seq_id, float(self.config.num_speculative_tokens))
        return max(0, min(most, self.config.num_speculative_tokens, int(mean + 0.5) + 1))

    def propose(self, requests: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        """Draft tokens for each (seq_id, its prompt and output so far, how many at most), by seq_id; a sequence
        nothing is proposed for is left out. With a draft model, call it on the forward thread."""
        if self.draft is not None:
            return self.draft.propose(requests)
        drafts = {}
        for seq_id, token_ids, k in requests:
            index = self.indexes.get(seq_id)
            if index is None:
                index = self.indexes[seq_id] = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
            n, found = index.propose(token_ids, k)
            if self.suffix is not None:
                m, shared = self.suffix.propose(token_ids, k)
                if m > n or (m == n and len(shared) > len(found)):
                    found = shared
            if found:
                drafts[seq_id] = found
        return drafts

    def verified(self, seq_id: str, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.draws += 1
        mean = self.accepting.get(seq_id, float(self.config.num_speculative_tokens))
        self.accepting[seq_id] = _DECAY * mean + (1 - _DECAY) * accepted

    def finished(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        """A sequence ended with this output: the suffix method keeps it for later requests."""
        if self.suffix is not None:
            self.suffix.add(token_ids[max(0, num_prompt_tokens - self.config.prompt_lookup_max):])

    def retain(self, seq_ids) -> None:
        """Forget the state of sequences no longer running (rebuilt from their tokens if they return)."""
        for table in (self.indexes, self.accepting):
            for seq_id in table.keys() - set(seq_ids):
                del table[seq_id]
        if self.draft is not None:
            self.draft.retain(seq_ids)

    def stats(self) -> dict:
        return {"spec_draft_tokens": self.proposed, "spec_accepted_tokens": self.accepted,
                "spec_acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
                # tokens a verified draw emits: its accepted drafts and the one after them
                "spec_mean_accepted_length": 1 + self.accepted / self.draws if self.draws else 0.0,
                "spec_verified_draws": self.draws, "spec_steps": self.steps,
                "spec_steps_skipped": self.steps_skipped,
                "spec_suffix_cached_tokens": self.suffix.size if self.suffix is not None else 0,
                **(self.draft.stats() if self.draft is not None else {})}
