"""The sampler: one token per row of logits, each row with its own parameters and random stream.

A row's distribution is built in SamplingParams' order: a structured output's mask first (`mask_logits`:
forbidden tokens' logits become -inf), then penalties on the sample's own output so far,
temperature, then top-k, top-p and min-p, each removing tokens (their logits become -inf). The token is
drawn from that distribution, and its logprobs, when asked for, are that distribution's log-probabilities,
so a logprob is exactly what the draw saw. Greedy rows take the argmax of the penalized logits, and their
logprobs are those logits' log-softmax (temperature 1: the argmax does not depend on it).

Speculative decoding (`verify`): a draw with drafts has a row of logits for its last token and one per draft.
Row j's token is sampled exactly as it would be without speculation once drafts[:j] were accepted; the drafts
are accepted while each equals the token sampled before it.
"""
from __future__ import annotations

import torch

from kvmux import _native
from kvmux.ops.threads import threads
from kvmux.sampling import SamplingParams
from kvmux.step.work import Sampled

_MIN_TEMPERATURE = 1e-30  # well above float32's smallest normal, far below any useful value
_NUCLEUS_FIRST_K = 64  # tokens the nucleus is first looked for among (nucleus)

# Seeds are mixed with the token index so that each output token draws from its own
# stream: the draw depends only on (seed, token_index), never on batch composition or
# on whether the sequence was preempted and recomputed in between.
_INDEX_MIX = 0x9E3779B97F4A7C15


def draw_seed(seed: int, token_index: int) -> int:
    return (seed * 6364136223846793005 + token_index * _INDEX_MIX) & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(seed: int, index: int) -> int:
    """Seed of parallel sample `index`: sample 0 keeps the request's seed, so it equals an n=1 request."""
    if index == 0:
        return seed
    # A different multiplier from draw_seed, so sample streams never line up with token streams.
    return ((seed ^ 0x5DEECE66D) * 0xD1B54A32D192ED03 + index * _INDEX_MIX) & 0x7FFF_FFFF_FFFF_FFFF


_BITS = torch.arange(32, dtype=torch.int32)


def mask_logits(logits: torch.Tensor, bitmasks: torch.Tensor, rows: list[int], mask_rows: list[int]) -> torch.Tensor:
    """logits [K, vocab] with -inf wherever logits row rows[i]'s bitmask (bitmasks[mask_rows[i]], bit t of
    int32 word t // 32 set where token t is allowed) forbids a token; a logit past the mask's width is forbidden."""
    words = bitmasks[torch.tensor(mask_rows)].to(logits.device)
    allowed = ((words.unsqueeze(-1) >> _BITS.to(logits.device)) & 1).bool().flatten(1)  # [len(rows), 32 * words]
    width = logits.shape[1]
    if allowed.shape[1] < width:
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
    index = torch.tensor(rows, device=logits.device)
    logits = logits.clone()
    logits[index] = logits[index].masked_fill(~allowed[:, :width], float("-inf"))
    return logits


def penalize(row: torch.Tensor, params: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """OpenAI's penalties: each token's logit minus frequency x its count in the output, minus presence if > 0."""
    if not params.penalized or not output_ids:
        return row
    counts = torch.bincount(torch.tensor(output_ids, device=row.device), minlength=row.numel()).to(row.dtype)
    return row - counts * params.frequency_penalty - (counts > 0).to(row.dtype) * params.presence_penalty


def nucleus(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """The row with all but the smallest set of likeliest tokens whose mass reaches top_p at -inf (at least one
    token). The set is found among the likeliest k, k widened until their mass reaches top_p, rather than by
    sorting the whole vocabulary: it is a few dozen tokens as a rule, and sorting Gemma 3's 262k took 12 MB of
    scratch, which set `kvmux generate`'s peak memory."""
    probs = torch.softmax(row, dim=-1)
    k = min(_NUCLEUS_FIRST_K, probs.numel())
    while True:
        top, order = torch.topk(probs, k)
        mass = top.cumsum(0)
        if mass[-1] >= top_p or k == probs.numel():
            break
        k = min(4 * k, probs.numel())
    keep = order[mass - top < top_p]  # each kept token's likelier ones hold less than top_p
    return torch.full_like(row, float("-inf")).index_copy_(0, keep, row[keep])


def filtered(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: the logits of the distribution a sampled row draws from."""
    # Shift the top logit to 0 and divide by at least a float32-representable temperature: a tiny one
    # then sends the rest to -inf (greedy) instead of making inf/NaN probabilities, which would fail
    # the whole batch's step and so hurt every other request in it.
    row = (row - row.max()) / max(params.temperature, _MIN_TEMPERATURE)
    if params.top_k and params.top_k < row.numel():
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p < 1.0:
        row = nucleus(row, params.top_p)
    if params.min_p > 0.0:
        probs = torch.softmax(row, dim=-1)
        row = row.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return row


def _with_logprobs(token: int, row: torch.Tensor, k: int) -> Sampled:
    logprobs = torch.log_softmax(row, dim=-1)
    top = []
    if k:
        values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
        top = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]
    return Sampled(token, float(logprobs[token]), top)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first, on ties; a NaN first of all, as torch's max): float32 rows on the CPU natively,
    on the kernels' threads (native/cpu/row_argmax.h: torch's max took 16 ms of a 150 ms decode step over 64 rows
    of Gemma 3's 262k vocabulary, on one thread), others by torch's max."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and logits.numel() > 0):
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        _native.row_argmax_f32(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0),
                               out.data_ptr(), threads())
        return out
    return logits.max(dim=-1).indices


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], token_indices: list[int],
           output_ids: list[list[int]]) -> list[Sampled]:
    """One token per row of logits [K, vocab]; seeds and token_indices give each row its random stream, output_ids
    each row's output so far (what penalties count; empty when the row has none)."""
    out = [Sampled(t) for t in argmax_rows(logits).tolist()]
    generator = torch.Generator(device=logits.device)
    for i, p in enumerate(params):
        if p.greedy and not p.penalized and p.logprobs is None:
            continue  # the argmax above
        row = penalize(logits[i].float(), p, output_ids[i])
        if p.greedy:
            token = int(row.argmax()) if p.penalized else out[i].token
        else:
            row = filtered(row, p)
            generator.manual_seed(draw_seed(seeds[i], token_indices[i]))
            token = int(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generator))
        out[i] = Sampled(token) if p.logprobs is None else _with_logprobs(token, row, p.logprobs)
    return out


def verify(logits: torch.Tensor, params: SamplingParams, seed: int, token_index: int, output_ids: list[int],
           drafts: list[int]) -> list[Sampled]:
    """The run a draw with drafts emits from logits [len(drafts) + 1, vocab]: the accepted drafts, then the token
    sampled after them (where a draft was rejected, or after the last).

    Each token is drawn from the same random stream (seed, its token index) and distribution (penalties counting
    the drafts before it) as without speculation, so the output is token for token the same. Our proposers
    propose one token with certainty (q, a point mass on the draft d), and this is then the rejection-sampling
    rule: d is accepted with probability p(d) = min(1, p(d) / q(d)), and on rejection the token is p given
    "not d", the normalised residual max(0, p - q).
    """
    if params.greedy and not params.penalized and params.logprobs is None:
        tokens = argmax_rows(logits).tolist()
        accepted = 0
        while accepted < len(drafts) and tokens[accepted] == drafts[accepted]:
            accepted += 1
        return [Sampled(t) for t in tokens[:accepted + 1]]
    run = []
    for j in range(len(drafts) + 1):
        history = output_ids + drafts[:j] if params.penalized else []
        drawn = sample(logits[j:j + 1], [params], [seed], [token_index + j], [history])[0]
        run.append(drawn)
        if j == len(drafts) or drawn.token != drafts[j]:
            break
    return run
