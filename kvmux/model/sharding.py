"""Which slice of the model a tensor-parallel rank holds.

Megatron's split, as vLLM makes it: q/k/v and gate/up are column-parallel
(each rank computes its heads and its MLP features), o and down are
row-parallel (each rank multiplies its slice of the inputs; an all-reduce
sums the partial outputs), the embedding and the LM head are split by
vocabulary. Where the ranks outnumber the KV heads, each KV head is
replicated on size / num_kv_heads ranks so every rank holds whole heads
(the query heads of a rank always share one KV head then).

A rank's model is an ordinary LlamaForCausalLM built from `rank_config`
(its head, feature and vocabulary counts) and loaded with the slices
`shard_weight` cuts from the checkpoint; the collectives are the only
other difference (kvmux/parallel/collectives.py).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from kvmux.model.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    rank: int  # among the model ranks, 0..size-1
    size: int
    num_heads: int  # the whole model's
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, config, rank: int, size: int) -> Shard:
        shard = cls(rank, size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                    config.intermediate_size, config.vocab_size)
        shard.check()
        return shard

    def check(self) -> None:
        """Refuse a split the model does not allow, saying which counts disagree."""
        problems = []
        if self.num_heads % self.size:
            problems.append(f"its {self.num_heads} query heads")
        if self.size <= self.num_kv_heads and self.num_kv_heads % self.size:
            problems.append(f"its {self.num_kv_heads} KV heads")
        if self.size > self.num_kv_heads and self.size % self.num_kv_heads:
            problems.append(f"its {self.num_kv_heads} KV heads (more ranks than KV heads must be a multiple of "
                            f"them, to replicate each)")
        if self.intermediate_size % self.size:
            problems.append(f"its {self.intermediate_size} MLP features")
        if problems:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide the model: "
                             f"{', '.join(problems)}")

    @property
    def heads(self) -> range:
        per = self.num_heads // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> range:
        if self.size <= self.num_kv_heads:
            per = self.num_kv_heads // self.size
            return range(self.rank * per, (self.rank + 1) * per)
        head = self.rank // (self.size // self.num_kv_heads)  # replicated: this rank's query heads share it
        return range(head, head + 1)

    @property
    def features(self) -> range:
        per = self.intermediate_size // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.size)  # the last rank's slice is padded with zero rows

    @property
    def vocab(self) -> range:
        return range(self.rank * self.vocab_per_rank, (self.rank + 1) * self.vocab_per_rank)


def rank_config(config: ModelConfig, shard: Shard) -> ModelConfig:
    """The config of a rank's model: its heads, KV heads, MLP features and vocabulary slice."""
    return dataclasses.replace(config, num_attention_heads=len(shard.heads), num_key_value_heads=len(shard.kv_heads),
                               intermediate_size=len(shard.features), vocab_size=shard.vocab_per_rank)


def _rows(t: torch.Tensor, heads: range, head_dim: int) -> torch.Tensor:
    return t[heads.start * head_dim:heads.stop * head_dim]


def _vocab_rows(t: torch.Tensor, shard: Shard) -> torch.Tensor:
    rows = t[shard.vocab.start:min(shard.vocab.stop, shard.vocab_size)]
    pad = shard.vocab_per_rank - rows.shape[0]
    return torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])]) if pad else rows


_LAYER = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def shard_weight(name: str, tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The rank's slice of one checkpoint tensor (by its Hugging Face name). Replicated tensors (norms,
    Qwen3's per-head q/k norms) come back whole; a row-parallel bias only on rank 0, since the all-reduce
    adds every rank's output."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return _vocab_rows(tensor, shard)
    match = _LAYER.search(name)
    if match is None:
        return tensor
    _, proj, kind = match.groups()
    if proj == "q_proj":
        return _rows(tensor, shard.heads, shard.head_dim)
    if proj in ("k_proj", "v_proj"):
        return _rows(tensor, shard.kv_heads, shard.head_dim)
    if proj in ("gate_proj", "up_proj"):
        return tensor[shard.features.start:shard.features.stop]
    if proj in ("o_proj", "down_proj"):
        if kind == "bias":
            return tensor if shard.rank == 0 else torch.zeros_like(tensor)
        cols = shard.heads if proj == "o_proj" else shard.features
        step = shard.head_dim if proj == "o_proj" else 1
        return tensor[:, cols.start * step:cols.stop * step]
    return tensor  # q_norm / k_norm: one weight shared by every head
