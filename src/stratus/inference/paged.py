"""Paged KV memory for the serving engine, as vLLM keeps it.

The pool is fixed-size blocks of `block_size` positions for every layer, allocated once from a
memory budget; a sequence holds a block table and takes a block when it grows into one.
A full block is hashed by its tokens and every token before them; a later sequence whose
prompt starts with the same tokens (a shared system prompt, the n choices of one request)
takes the same blocks instead of computing them again. Blocks no sequence holds stay
cached until the pool needs them, oldest first (LRU).

Attention over the pool (PagedStep.attend) runs torch's SDPA over gathered blocks: each row's
keys and values are gathered from its blocks into one padded batch for the decode rows, and
one gather per prefilling row. On a CPU that copy is small against the matmuls; a GPU would
want FlexAttention with a block mask or a paged kernel (not installed here).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F

from stratus.config import ModelConfig


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A full block's identity: its tokens and, through the parent's hash, every token before."""
    return hashlib.blake2b(parent + b",".join(str(t).encode() for t in tokens), digest_size=16).digest()


class BlockPool:
    def __init__(
        self, cfg: ModelConfig, blocks: int, block_size: int, device, dtype: torch.dtype, kv_heads: int = 0
    ):
        # slots flat: block b's position p is slot b * block_size + p; a tensor-parallel
        # rank keeps only its own kv_heads
        shape = (cfg.n_layers, blocks * block_size, kv_heads or cfg.kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.blocks, self.block_size = blocks, block_size
        self.refs = [0] * blocks
        self.hash_of: list[bytes | None] = [None] * blocks
        self.cached: dict[bytes, int] = {}  # hash -> block, held or not
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.free = list(range(blocks - 1, -1, -1))  # never hashed, or evicted
        self.hits = self.lookups = 0  # prefix-cache blocks found / asked for

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_heads: int = 0) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * block_size * (kv_heads or cfg.kv_heads) * cfg.head_dim * element

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def take(self, n: int) -> list[int] | None:
        """n blocks for new positions: free ones first, then the least recently used cached
        ones (forgetting their hash). None, and nothing taken, when the pool has fewer."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of[b]]  # type: ignore[arg-type]
                self.hash_of[b] = None
            self.refs[b] = 1
            out.append(b)
        return out

    def share(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each now held once more."""
        out = []
        self.lookups += len(hashes)
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
            out.append(b)
        self.hits += len(out)
        return out

    def publish(self, block: int, h: bytes) -> None:
        """A block has filled: later sequences with the same prefix may share it."""
        if self.hash_of[block] is None and h not in self.cached:
            self.hash_of[block] = h
            self.cached[h] = block

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.hash_of[b] is None:
                    self.free.append(b)
                else:
                    self.evictable[b] = None  # most recently used last


class PagedStep:
    """One forward's view of the pool: where each row's new keys and values go, and which
    positions each row attends to. Rows are the flattened batch's sequences in order; a row
    is (block table, first new position, new tokens)."""

    def __init__(self, pool: BlockPool, rows: list[tuple[list[int], int, int]], device):
        self.pool = pool
        bs = pool.block_size
        offset = torch.arange(bs, device=device)

        def gather(tables: list[list[int]], longest: int) -> torch.Tensor:
            """(rows, longest) slots of positions 0.. of each row, from its block table:
            one small tensor of block ids a step, not a Python list of every position."""
            width = -(-longest // bs)
            padded = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], device=device)
            return (padded[:, :, None] * bs + offset).view(len(tables), -1)[:, :longest]

        new, off = [], 0
        decode_rows, decode_tables, decode_len = [], [], []
        self.prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []
        for blocks, start, t in rows:
            new += [blocks[p // bs] * bs + p % bs for p in range(start, start + t)]
            if t == 1:
                decode_rows.append(off)
                decode_tables.append(blocks)
                decode_len.append(start + 1)
            elif start == 0:  # nothing before it: causal attention over its own keys
                self.prefills.append((off, t, None, None))
            else:  # a chunk after cached positions: the keys so far, and an offset causal mask
                q_pos = torch.arange(start, start + t, device=device)
                mask = q_pos[:, None] >= torch.arange(start + t, device=device)[None, :]
                self.prefills.append((off, t, gather([blocks], start + t)[0], mask))
            off += t
        self.new = torch.tensor(new, device=device)
        self.decode_rows = torch.tensor(decode_rows, device=device, dtype=torch.long) if decode_rows else None
        self.only_decodes = len(decode_rows) == off  # every token a decode: no indexing of q or y
        self.decode_mask = None
        if decode_rows:
            longest = max(decode_len)
            self.decode_gather = gather(decode_tables, longest)
            if min(decode_len) < longest:  # (rows, 1, 1, keys): a row's padding is hidden
                lengths = torch.tensor(decode_len, device=device)
                visible = torch.arange(longest, device=device)[None, :] < lengths[:, None]
                self.decode_mask = visible[:, None, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, heads, N, hd); k, v (1, kv_heads, N, hd) of the flattened batch's N tokens."""
        kp, vp = self.pool.k[layer], self.pool.v[layer]  # (slots, kv_heads, hd)
        kp.index_copy_(0, self.new, k[0].transpose(0, 1))
        vp.index_copy_(0, self.new, v[0].transpose(0, 1))
        gqa = q.shape[1] != k.shape[1]
        if self.decode_rows is not None:
            qd = q[0] if self.only_decodes else q[0, :, self.decode_rows]
            qd = qd.transpose(0, 1).unsqueeze(2)  # (rows, heads, 1, hd)
            rows, longest = self.decode_gather.shape
            # index_select, not kp[index]: advanced indexing costs 5x as much on small gathers
            flat = self.decode_gather.reshape(-1)
            keys = kp.index_select(0, flat).view(rows, longest, *kp.shape[1:])
            values = vp.index_select(0, flat).view(rows, longest, *vp.shape[1:])
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (rows, kv_heads, longest, hd)
            yd = F.scaled_dot_product_attention(qd, keys, values, attn_mask=self.decode_mask, enable_gqa=gqa)
            yd = yd.squeeze(2).transpose(0, 1)  # (heads, rows, hd)
            if self.only_decodes:
                return yd.unsqueeze(0)
        y = torch.empty_like(q)
        if self.decode_rows is not None:
            y[0, :, self.decode_rows] = yd
        for off, t, gather, mask in self.prefills:
            qp = q[:, :, off : off + t]
            if gather is None:
                keys, values = k[:, :, off : off + t], v[:, :, off : off + t]
            else:
                keys = kp.index_select(0, gather).transpose(0, 1).unsqueeze(0)
                values = vp.index_select(0, gather).transpose(0, 1).unsqueeze(0)
            y[:, :, off : off + t] = F.scaled_dot_product_attention(
                qp, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
            )
        return y
