"""A Llama-style decoder-only transformer: RoPE, RMSNorm, grouped-query attention, SwiGLU.

The model knows nothing of parallelism. Its submodule names (tok_embeddings, layers.N.
attention.wq, ..., norm, output) are the ones that distributed/ plans tensor parallelism
and FSDP wrapping against, and that the Hugging Face export maps from. Heads are reshaped
with -1 so that a tensor-parallel shard (fewer local heads) runs the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stratus import counts
from stratus.config import ModelConfig
from stratus.model.kv_cache import KVCache


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_len, head_dim // 2), for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, T, head_dim) by position; cos/sin are (T, head_dim // 2), or
    (batch, 1, T, head_dim // 2) when each row has positions of its own."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (batch, T, d_model)
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        mask: torch.Tensor | None = None,  # (batch, 1, T, T) bool: which keys each query sees
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, heads, t, hd)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv_heads, t, hd)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if cos.dim() == 2:  # the table from this call's first position on
            cos, sin = cos[:t], sin[:t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        causal = mask is None
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (b, kv_heads, start + t, hd)
            if start > 0:
                causal = False  # the top-left causal mask of SDPA is wrong once keys precede queries
                if t > 1:
                    pos_q = torch.arange(start, start + t, device=x.device)
                    mask = pos_q[:, None] >= torch.arange(start + t, device=x.device)[None, :]
        gqa = q.shape[1] != k.shape[1]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_width, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_width, bias=False)
        self.w2 = nn.Linear(cfg.ffn_width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A dict keyed by layer index keeps parameter names stable when a pipeline stage
        # deletes the layers it does not own.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std); the projections that write into the residual stream are
        scaled by 1/sqrt(2 n_layers) (GPT-2), so the residual's variance stays bounded.
        Works in place on sharded (DTensor) parameters too, after a meta-device build."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, std)
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        doc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (batch, T) -> logits (batch, T, vocab). With a cache, the tokens sit at
        positions start..start+T-1 and their keys/values are appended to it. With doc
        (batch, T), the document each token belongs to in a packed row: a token attends only
        within its document, and positions restart at each document's first token."""
        mask = None
        if doc is None:
            # The attention cuts the table to its sequence length: the hidden states a later
            # pipeline stage takes in may be a sequence-parallel shard, shorter than the
            # sequence attention sees.
            cos, sin = self.rope_cos[start:], self.rope_sin[start:]
        else:
            t = doc.shape[1]
            idx = torch.arange(t, device=tokens.device)
            first = torch.ones_like(doc, dtype=torch.bool)
            first[:, 1:] = doc[:, 1:] != doc[:, :-1]
            pos = idx - torch.where(first, idx, 0).cummax(dim=1).values  # (batch, T)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
            same = doc[:, :, None] == doc[:, None, :]
            mask = (same & (idx[:, None] >= idx[None, :])).unsqueeze(1)
        # A part of the model (a pipeline stage: distributed/ sets the parts it does not own to
        # None) takes and gives the hidden states in their place.
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for i, layer in self.layers.items():
            h = layer(h, cos, sin, cache, int(i), start, mask)
        return self.output(self.norm(h)) if self.output is not None else h

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.output.weight
        return KVCache(
            self.cfg.n_layers,
            batch,
            self.cfg.kv_heads,
            max_len or self.cfg.max_seq_len,
            self.cfg.head_dim,
            p.device,
            p.dtype,
        )

    def num_params(self, embeddings: bool = True) -> int:
        """The whole model's, from its config (a pipeline stage's part reports the whole)."""
        return counts.param_count(counts.shape_of(self.cfg), embeddings)

    def flops_per_token(self, seq_len: int) -> int:
        """Model FLOPs (forward + backward, no recompute) per trained token: MFU's numerator."""
        return counts.model_flops_per_token(counts.shape_of(self.cfg, seq_len))
