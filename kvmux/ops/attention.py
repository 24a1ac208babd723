"""Paged attention: new K/V go into their pool slots, queries read context only via block tables.

`paged_attention` is the one entry point the model calls; it dispatches to a
backend by name:

- "torch": `torch_paged_attention`, gather-then-SDPA; the reference every
  other backend is checked against, kept selectable for debugging;
- "native": the fused kernels of the extension modules, the C++ one for CPU
  tensors (`kvmux.ops.cpu_attention`), the CUDA one for CUDA tensors
  (`kvmux.ops.cuda_attention`); an error where none is built for the device;
- "auto": "native" where a kernel exists for the device, else "torch".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvmux.cache.kv_cache import KVCache, from_slabs, load_rows, slab_positions, store_rows
from kvmux.ops.cpu_attention import cpu_paged_attention
from kvmux.step.forward_batch import ForwardBatch


@dataclass
class _OneTokenGroup:
    """All sequences with one new token, attended together in one SDPA call."""

    token_idx: torch.Tensor     # [B] packed index of each one's token
    block_tables: torch.Tensor  # [B, nb] int64, nb = most blocks any of them uses
    context_lens: torch.Tensor  # [B]
    block_size: int
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # by window: made once a step, read every layer

    def mask(self, window: int) -> torch.Tensor:
        """[B, 1, 1, nb * block_size] bool, True where the slot is context the token sees."""
        if window not in self.masks:
            slots = torch.arange(self.block_tables.shape[1] * self.block_size, device=self.context_lens.device)
            mask = slots[None, :] < self.context_lens[:, None]
            if window:
                mask &= slots[None, :] >= self.context_lens[:, None] - window
            self.masks[window] = mask[:, None, None, :]
        return self.masks[window]


@dataclass
class _PrefillSeq:
    """One sequence with several new tokens (a prompt chunk), attended on its own."""

    start: int                  # packed range of its new tokens
    end: int
    block_table: torch.Tensor   # [nb] int64, just the blocks covering its context
    context_len: int
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)  # by window, as _OneTokenGroup's

    def mask(self, window: int) -> torch.Tensor | None:
        """[query_len, context_len] bool; None = plain causal (no cached prefix, no window)."""
        if window not in self.masks:
            qlen, ctx = self.end - self.start, self.context_len
            mask = None
            if ctx > qlen or window:
                # Query t sits at position ctx - qlen + t and sees keys 0..that position (the last `window` of them).
                q_pos = torch.arange(ctx - qlen, ctx, device=self.block_table.device)[:, None]
                keys = torch.arange(ctx, device=self.block_table.device)[None, :]
                mask = keys <= q_pos
                if window:
                    mask &= keys > q_pos - window
            self.masks[window] = mask
        return self.masks[window]


@dataclass
class _TorchMetadata:
    """What the reference backend derives once per step and reuses in every layer."""

    slot_blocks: torch.Tensor   # [T] block of each new token's slot
    slot_offsets: torch.Tensor  # [T] offset inside that block
    one_token: _OneTokenGroup | None
    prefills: list[_PrefillSeq]


def _torch_metadata(batch: ForwardBatch, block_size: int) -> _TorchMetadata:
    device = batch.input_ids.device
    one_token_seqs, prefills = [], []
    start = 0
    for i, (qlen, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if qlen == 1:
            one_token_seqs.append((i, start, ctx))
        else:
            nb = -(-ctx // block_size)
            prefills.append(_PrefillSeq(start, start + qlen, batch.block_tables[i, :nb].long(), ctx))
        start += qlen

    one_token = None
    if one_token_seqs:
        rows = torch.tensor([i for i, _, _ in one_token_seqs], device=device)
        nb = -(-max(c for _, _, c in one_token_seqs) // block_size)
        one_token = _OneTokenGroup(
            token_idx=torch.tensor([s for _, s, _ in one_token_seqs], device=device),
            block_tables=batch.block_tables[rows, :nb].long(),
            context_lens=torch.tensor([c for _, _, c in one_token_seqs], device=device), block_size=block_size)
    return _TorchMetadata(batch.slot_mapping // block_size, batch.slot_mapping % block_size, one_token, prefills)


def _gather(layer_kv: torch.Tensor, blocks: torch.Tensor, which: int, block_size: int) -> torch.Tensor:
    """K (which=0) or V (1) of `blocks` [..., nb] as [..., Hkv, nb * block_size, D], in float32."""
    g = layer_kv[blocks, which]                  # [..., nb, Hkv, bs, D], an int8 pool's [..., nb, Hkv, slab]
    # An int8 pool's K less its k_mean.
    g = load_rows(from_slabs(g, which, block_size)) if g.dtype == torch.int8 else g.float()
    g = g.movedim(-4, -3)                        # [..., Hkv, nb, bs, D]
    return g.reshape(*g.shape[:-3], -1, g.shape[-1])


def torch_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                          layer: int, batch: ForwardBatch, scale: float, window: int = 0) -> torch.Tensor:
    meta = batch.attn_metadata
    if not isinstance(meta, _TorchMetadata):
        meta = batch.attn_metadata = _torch_metadata(batch, kv_cache.block_size)

    layer_kv = kv_cache.kv[:, layer]  # [NB, 2, Hkv, bs, D], a view into the pool
    block_size = kv_cache.block_size
    if kv_cache.dtype == torch.int8:
        # Each new token's row bytes go where its slab keeps them: [T, Hkv, row] positions of [NB, Hkv, slab].
        mean = None if kv_cache.k_mean is None else kv_cache.k_mean[layer].to(k.device)
        heads = torch.arange(k.shape[1], device=k.device)[None, :, None]
        blocks = meta.slot_blocks[:, None, None]
        for which, rows in ((0, store_rows(k, mean)), (1, store_rows(v))):
            at = slab_positions(which, block_size, k.shape[2]).to(k.device)[meta.slot_offsets][:, None, :]
            layer_kv[:, which][blocks, heads, at] = rows
    else:
        # Put block and offset side by side so one index_put writes all new tokens.
        layer_kv[:, 0].transpose(1, 2)[meta.slot_blocks, meta.slot_offsets] = k.to(kv_cache.dtype)
        layer_kv[:, 1].transpose(1, 2)[meta.slot_blocks, meta.slot_offsets] = v.to(kv_cache.dtype)

    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)

    if meta.one_token is not None:
        d = meta.one_token
        keys = _gather(layer_kv, d.block_tables, 0, block_size)    # [B, Hkv, N, D]
        values = _gather(layer_kv, d.block_tables, 1, block_size)
        # With one query token, the `group` query heads sharing a KV head can
        # stand in the query-length axis: GQA without repeating K/V.
        qd = q[d.token_idx].float().view(-1, num_kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=d.mask(window), scale=scale)
        out[d.token_idx] = o.reshape(-1, num_heads, head_dim)

    for p in meta.prefills:
        keys = _gather(layer_kv, p.block_table, 0, block_size)[:, :p.context_len]  # [Hkv, ctx, D]
        values = _gather(layer_kv, p.block_table, 1, block_size)[:, :p.context_len]
        qp = q[p.start:p.end].float().transpose(0, 1)                  # [Hq, qlen, D]
        mask = p.mask(window)
        o = F.scaled_dot_product_attention(
            qp[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None,
            scale=scale, enable_gqa=True)
        out[p.start:p.end] = o[0].transpose(0, 1)

    return out.to(q.dtype)


def native_available(device: torch.device) -> bool:
    """Whether a native kernel is built for tensors on `device`."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        from kvmux.ops import cuda_attention
        return cuda_attention.available()
    return False


def native_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                           layer: int, batch: ForwardBatch, scale: float, window: int = 0) -> torch.Tensor:
    if q.device.type == "cuda":
        # Imported here so CPU-only installs never touch the CUDA module.
        from kvmux.ops.cuda_attention import cuda_paged_attention
        return cuda_paged_attention(q, k, v, kv_cache, layer, batch, scale, window=window)
    if q.device.type != "cpu":
        raise ValueError(f"q: no native attention kernel for device {q.device}")
    return cpu_paged_attention(q, k, v, kv_cache, layer, batch, scale, window=window)


def auto_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                         layer: int, batch: ForwardBatch, scale: float, window: int = 0) -> torch.Tensor:
    fn = native_paged_attention if native_available(q.device) else torch_paged_attention
    return fn(q, k, v, kv_cache, layer, batch, scale, window)


_BACKENDS = {"torch": torch_paged_attention, "native": native_paged_attention, "auto": auto_paged_attention}
BACKENDS = tuple(_BACKENDS)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                    layer: int, batch: ForwardBatch, scale: float, backend: str = "auto",
                    window: int = 0) -> torch.Tensor:
    """Write k, v [T, Hkv, D] into their slots, then attend q [T, Hq, D] causally over each context: over its
    last `window` tokens (the query's own included) where window > 0, as a sliding-window layer does.

    Returns [T, Hq, D] in q's dtype.
    """
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; known: {sorted(_BACKENDS)}") from None
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: no sliding window), not {window}")
    return fn(q, k, v, kv_cache, layer, batch, scale, window)
