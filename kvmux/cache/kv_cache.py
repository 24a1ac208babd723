"""The KV pool: one block-major tensor shared by every sequence."""

from __future__ import annotations

import torch


class KVCache:
    """Owns `kv[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]`.

    Block-major so that one block across all layers is a single contiguous
    region: copy-on-write and host swaps are then one copy per block.
    """

    def __init__(self, num_blocks: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"KV cache dtype must be float32 or bfloat16, got {dtype}")
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        # Zeroed, not empty: attention multiplies masked-out slots by a zero
        # weight, and 0 * NaN from uninitialised memory would poison the output.
        self.kv = torch.zeros(num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim,
                              dtype=dtype, device=device)

    @staticmethod
    def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * num_kv_heads * block_size * head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]

    @property
    def num_layers(self) -> int:
        return self.kv.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.kv.shape[3]

    @property
    def block_size(self) -> int:
        return self.kv.shape[4]

    @property
    def head_dim(self) -> int:
        return self.kv.shape[5]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def bytes_per_block(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each src block onto its dst block, all layers (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=self.kv.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=self.kv.device)
        # The gather on the right materialises before the scatter, so a block
        # that is both a source and a destination reads its old contents.
        self.kv[dst] = self.kv[src]
