"""Where a forward keeps keys and values and attends through them.

The model calls `cache.attend(layer, q, k, v)` with the new tokens' rotated queries, keys and
values; the cache stores the keys and values where it keeps them and returns the attention
output. Training passes no cache (causal attention over the sequence). `generate` uses the
contiguous KVCache below; the serving engine a paged one (inference/paged.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionCache(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (batch, heads, T, hd); k, v (batch, kv_heads, T, hd) -> (batch, heads, T, hd)."""
        ...


class KVCache:
    """A preallocated cache for rows that all stand at the same position (`generate`): each
    forward appends its T tokens after the `length` already held."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layers, self.max_len = n_layers, max_len
        self.length = 0  # positions held; the last layer's call moves it on

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, t = self.length, k.shape[2]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        if start == 0:  # nothing before: attend over the new keys themselves
            keys, values = k, v
        else:
            keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        # SDPA's causal mask is top-left aligned: right once keys precede the queries only
        # through an explicit mask
        mask = None
        if start > 0 and t > 1:
            pos_q = torch.arange(start, end, device=q.device)
            mask = pos_q[:, None] >= torch.arange(end, device=q.device)[None, :]
        gqa = q.shape[1] != keys.shape[1]
        y = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=start == 0 and t > 1, enable_gqa=gqa
        )
        if layer == self.n_layers - 1:
            self.length = end
        return y
