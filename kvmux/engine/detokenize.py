"""Incremental detokenization that never emits half of a multi-byte character."""
from __future__ import annotations

# Tokens decoded before the new ones, so tokenizers that drop or merge leading
# spaces at the start of a decode see the same context they would mid-text.
_CONTEXT_TOKENS = 5


def initial_offsets(num_prompt_tokens: int) -> tuple[int, int]:
    start = max(0, num_prompt_tokens - _CONTEXT_TOKENS)
    return start, num_prompt_tokens


def detokenize_step(tokenizer, token_ids: list[int], prefix_offset: int, read_offset: int,
                    final: bool = False) -> tuple[str, int, int]:
    """Text added by tokens past read_offset, and the new offsets.

    Returns no text while the newest tokens decode to an incomplete UTF-8
    sequence (the replacement character); they are retried with the next token.
    On the final token whatever is left is flushed, replacement characters and all.
    """
    prefix = tokenizer.detokenize(token_ids[prefix_offset:read_offset], skip_special_tokens=True)
    full = tokenizer.detokenize(token_ids[prefix_offset:], skip_special_tokens=True)
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        return full[len(prefix):], read_offset, len(token_ids)
    return "", prefix_offset, read_offset
