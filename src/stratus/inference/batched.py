"""One forward pass for a batch whose sequences sit at different positions.

`Transformer.forward` takes one `start` for the whole batch: training and `generate` never
need more. Continuous batching puts sequences of different lengths side by side, so each
row needs its own RoPE positions, its own causal mask and its own cache slot. The model
stays as it is (it knows nothing of serving, and distributed/ plans against its module
names); this module walks the model's submodules in the order of `Block.forward`, with
per-row positions. tests/test_engine.py holds its logits equal to the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stratus.config import ModelConfig
from stratus.model import Transformer
from stratus.model.llama import apply_rope


class Fused:
    """Per layer, wq|wk|wv as one (q+2kv, d_model) weight and w1|w3 as one (2 ffn, d_model):
    one matmul instead of three and two. On a small model a decode step costs per operation,
    not per FLOP, so this is most of what a single stream can gain (torch.compile would
    fuse more, at a compile time per batch shape that a server cannot afford at start-up)."""

    def __init__(self, model: Transformer):
        self.qkv, self.gate_up, self.split = [], [], None
        for block in model.layers.values():
            att, ffn = block.attention, block.feed_forward
            qkv = torch.cat([att.wq.weight, att.wk.weight, att.wv.weight]).detach()
            gate_up = torch.cat([ffn.w1.weight, ffn.w3.weight]).detach()
            # The model's own parameters become views of the fused weights: no second copy.
            dq, dk = att.wq.weight.shape[0], att.wk.weight.shape[0]
            att.wq.weight = torch.nn.Parameter(qkv[:dq], requires_grad=False)
            att.wk.weight = torch.nn.Parameter(qkv[dq : dq + dk], requires_grad=False)
            att.wv.weight = torch.nn.Parameter(qkv[dq + dk :], requires_grad=False)
            dh = ffn.w1.weight.shape[0]
            ffn.w1.weight = torch.nn.Parameter(gate_up[:dh], requires_grad=False)
            ffn.w3.weight = torch.nn.Parameter(gate_up[dh:], requires_grad=False)
            self.qkv.append(qkv)
            self.gate_up.append(gate_up)
            self.split = [dq, dk, dk]


def _qkv(att, fused: Fused | None, i: int, x: torch.Tensor):
    if fused is None:
        return att.wq(x), att.wk(x), att.wv(x)
    return F.linear(x, fused.qkv[i]).split(fused.split, dim=-1)


def _ffn(block, fused: Fused | None, i: int, x: torch.Tensor) -> torch.Tensor:
    if fused is None:
        return block.feed_forward(x)
    gate, up = F.linear(x, fused.gate_up[i]).chunk(2, dim=-1)
    return block.feed_forward.w2(F.silu(gate) * up)


class SlotCache:
    """Keys and values for `slots` sequences of up to `max_len` tokens each, allocated once
    at start-up: the serving memory budget is fixed, and a request either gets a slot or
    waits in the queue; it never makes the process allocate more."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.n_layers, slots, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * cfg.kv_heads * max_len * cfg.head_dim * element

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@torch.inference_mode()
def forward_rows(
    model: Transformer,
    cache: SlotCache,
    slots: torch.Tensor,  # (B,) long: the cache slot of each row
    tokens: torch.Tensor,  # (B, T) long: T new tokens per row
    starts: torch.Tensor,  # (B,) long: the position of each row's first new token
    last_only: bool = True,
    fused: Fused | None = None,
) -> torch.Tensor:
    """Logits (B, vocab) of each row's last new token, or (B, T, vocab) with last_only=False.
    The new tokens' keys and values are written into each row's slot at its own positions;
    each row attends only to its own positions up to and including the query's."""
    b, t = tokens.shape
    if b == 1:
        return _forward_one(model, cache, int(slots[0]), tokens, int(starts[0]), last_only, fused)
    pos = starts[:, None] + torch.arange(t, device=tokens.device)  # (B, T)
    cos = model.rope_cos[pos][:, None]  # (B, 1, T, head_dim // 2): broadcasts over heads
    sin = model.rope_sin[pos][:, None]
    keys_len = int(pos.max()) + 1
    # Key j is visible to the query at position p when j <= p; positions past a row's own
    # length hold stale keys of an earlier request (or of a longer neighbour) and stay hidden.
    mask = torch.arange(keys_len, device=tokens.device)[None, None, None, :] <= pos[:, None, :, None]
    h = model.tok_embeddings(tokens)  # (B, T, d_model)
    for i, block in enumerate(model.layers.values()):
        att = block.attention
        x = block.attention_norm(h)
        q, k, v = _qkv(att, fused, i, x)
        q = q.view(b, t, -1, att.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        k = k.view(b, t, -1, att.head_dim).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = v.view(b, t, -1, att.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # advanced indices (slot, position) around a slice: the indexed view is (B, T, kv_heads, hd)
        cache.k[i][slots[:, None], :, pos] = k.transpose(1, 2)
        cache.v[i][slots[:, None], :, pos] = v.transpose(1, 2)
        keys = cache.k[i][slots, :, :keys_len]  # (B, kv_heads, keys_len, hd), gathered
        values = cache.v[i][slots, :, :keys_len]
        gqa = q.shape[1] != keys.shape[1]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        h = h + att.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = h + _ffn(block, fused, i, block.ffn_norm(h))
    if last_only:
        h = h[:, -1]
    return model.output(model.norm(h))


def _forward_one(
    model: Transformer,
    cache: SlotCache,
    slot: int,
    tokens: torch.Tensor,
    start: int,
    last_only: bool,
    fused: Fused | None,
) -> torch.Tensor:
    """One row (a prefill chunk, or a lone stream's decode step): the cache slot is a view,
    not a gathered copy, and the mask is needed only for a chunk that follows cached keys.
    A single stream's per-token cost is mostly such per-op overhead on a small model."""
    t = tokens.shape[1]
    end = start + t
    cos, sin = model.rope_cos[start:end], model.rope_sin[start:end]
    mask, causal = None, start == 0 and t > 1
    if start > 0 and t > 1:
        pos_q = torch.arange(start, end, device=tokens.device)
        mask = pos_q[:, None] >= torch.arange(end, device=tokens.device)[None, :]
    h = model.tok_embeddings(tokens)
    for i, block in enumerate(model.layers.values()):
        att = block.attention
        x = block.attention_norm(h)
        q, k, v = _qkv(att, fused, i, x)
        q = q.view(1, t, -1, att.head_dim).transpose(1, 2)
        k = k.view(1, t, -1, att.head_dim).transpose(1, 2)
        v = v.view(1, t, -1, att.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i, slot, :, start:end] = k[0]
        cache.v[i, slot, :, start:end] = v[0]
        keys, values = cache.k[i, slot : slot + 1, :, :end], cache.v[i, slot : slot + 1, :, :end]
        gqa = q.shape[1] != keys.shape[1]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        h = h + att.wo(y.transpose(1, 2).reshape(1, t, -1))
        h = h + _ffn(block, fused, i, block.ffn_norm(h))
    if last_only:
        h = h[:, -1]
    return model.output(model.norm(h))
