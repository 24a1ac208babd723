"""An int8 pool's K offset (KVCache.k_mean): the mean of each layer's post-RoPE K per KV head and channel.

RoPE'd K has channels whose values sit far from zero in every token (SmolLM2-135M: means up to 16 in size; in
layer 5 up to 9.7, where its channels' standard deviations have median 1.3), so an int8 row's max |x| / 127 step is
set by what all keys share.
Attention does not depend on that part: a query's scores all move by q.mean, which softmax drops, so the pool
stores K - mean and the kernels read it as they read K (native/cpu/paged_attention.h). The offset only has to be
the same for every key of a sequence; the closer to K's true mean, the finer the int8 step.

`calibrate_k_mean` measures it with one teacher-forced forward over a fixed sequence of token ids, as the engine
does at start for an int8 pool (kvmux/runner/runner.py). Seeded random ids need no tokenizer or text and did
nearly as well as documentation text (issue 25, SmolLM2-135M in float32, 12,834 teacher-forced positions, KL from
float32 KV with the avx2 / avx512bf16 kernels): 1.62e-4 / 1.76e-4 against 1.49e-4 / 1.63e-4, and 2.29e-4 / 2.40e-4
with rotation alone.
"""
from __future__ import annotations

import hashlib

import torch

from kvmux.cache.kv_cache import KVCache, PoolGeometry
from kvmux.step.forward_batch import ForwardBatch
from kvmux.step.work import Chunk

CALIBRATION_TOKENS = 512
CALIBRATION_SEED = 0
GRID = 16


def calibration_ids(vocab_size: int, n: int = CALIBRATION_TOKENS, seed: int = CALIBRATION_SEED) -> list[int]:
    """Seeded random token ids: no tokenizer or text needed, the same ids on every host."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


@torch.inference_mode()
def calibrate_k_mean(model, texts: list[list[int]], block_size: int = 16) -> torch.Tensor:
    """[num_layers, num_kv_heads, head_dim] float32: each model layer's K, as the model passes it to attention,
    averaged over every token of `texts` (one forward each, over a float32 pool of every layer)."""
    total, count = None, 0
    for ids in texts:
        blocks = -(-len(ids) // block_size)
        cache = KVCache(blocks, PoolGeometry(model.num_layers, model.num_kv_heads, model.head_dim, block_size,
                                             torch.float32), model.device)
        batch = ForwardBatch.build([Chunk("calibration", 0, ids, list(range(blocks)))], block_size, model.device)
        batch.logits_indices = torch.tensor([len(ids) - 1], device=model.device)
        model(batch, cache)
        k = cache.kv[:, :, 0]                                    # [blocks, layers, Hkv, bs, D]
        k = k.permute(1, 2, 0, 3, 4).reshape(model.num_layers, model.num_kv_heads, -1, model.head_dim)
        k = k[:, :, :len(ids)].double().sum(2)
        total = k if total is None else total + k
        count += len(ids)
    # On a grid of 1/16: close enough to K's mean (its channels spread by about 1 and more), and the same on every
    # host and tensor-parallel layout though their kernels sum in different orders (int8 rounding would turn the
    # last bits of a mean into different bytes, and a greedy token into another).
    return (torch.round(total / count * GRID) / GRID).float().cpu()


def pool_k_mean(model, geometry: PoolGeometry) -> torch.Tensor | None:
    """The k_mean an int8 pool of this geometry gets (None for other pools): calibrated over calibration_ids. A
    tensor-parallel rank runs the same forward, in step with the others, for its own KV heads."""
    if geometry.dtype != torch.int8:
        return None
    collectives = getattr(model, "collectives", None)  # a rank's config has its slice of the vocabulary
    ids = calibration_ids(collectives.shard.vocab_size if collectives is not None else model.config.vocab_size)
    return calibrate_k_mean(model, [ids], geometry.block_size)


def digest(k_mean: torch.Tensor) -> str:
    """What names a k_mean in a disk store's fingerprint: blocks written under one are wrong under another (its
    grid makes it the same on most hosts, not on all)."""
    return hashlib.sha256(k_mean.numpy().tobytes()).hexdigest()[:16]


def set_k_mean(kv_cache: KVCache, means: torch.Tensor, layer_types: list[str] | None = None) -> None:
    """Give an int8 pool (and its sliding-window pool, if any) the model layers' means, each pool's layers in
    model order (layer_types: the config's, where the sliding layers have a pool of their own)."""
    if kv_cache.dtype != torch.int8:
        return
    means = means.to(kv_cache.device)  # the kernels read it where they read the pool
    if kv_cache.sliding is None:
        kv_cache.k_mean = means.contiguous()
        return
    sliding = torch.tensor([t == "sliding_attention" for t in layer_types], device=means.device)
    kv_cache.k_mean = means[~sliding].contiguous()
    kv_cache.sliding.k_mean = means[sliding].contiguous()
