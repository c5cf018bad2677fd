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
from stratus.model.kv_cache import AttentionCache, KVCache


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
        self.qkv: torch.Tensor | None = None  # wq|wk|wv as one weight, after fuse_projections

    def forward(
        self,
        x: torch.Tensor,  # (batch, T, d_model)
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,  # (batch, 1, T, T) bool: which keys each query sees
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            q, k, v = F.linear(x, self.qkv).split(
                [self.wq.out_features, self.wk.out_features, self.wv.out_features], -1
            )
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, heads, t, hd)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv_heads, t, hd)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if cos.dim() == 2:  # the table from this call's first position on
            cos, sin = cos[:t], sin[:t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # the cache keeps k and v where it keeps them, and attends
            y = cache.attend(layer, q, k, v)
        else:
            gqa = q.shape[1] != k.shape[1]
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
            )
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_width, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_width, bias=False)
        self.w2 = nn.Linear(cfg.ffn_width, cfg.d_model, bias=False)
        self.gate_up: torch.Tensor | None = None  # w1|w3 as one weight, after fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, mask)
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
        positions: int | torch.Tensor = 0,
        cache: AttentionCache | None = None,
        doc: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (batch, T) -> logits (batch, T, vocab): the one forward of training,
        `generate`, eval and the serving engine.

        positions: the first token's position (every row from there on), or (batch, T) of
        each token's own. cache: where keys and values are kept and attended (model/kv_cache.py):
        none in training (causal attention over the sequence), a contiguous one in `generate`,
        a paged one in the engine. doc (batch, T): the document each token belongs to in a
        packed row: a token attends only within its document, and positions restart at each
        document's first token. select: indices into T of the only tokens whose logits are
        wanted (the engine samples each sequence's last), (batch, len(select), vocab)."""
        mask = None
        if doc is None and isinstance(positions, int):
            # The attention cuts the table to its sequence length: the hidden states a later
            # pipeline stage takes in may be a sequence-parallel shard, shorter than the
            # sequence attention sees.
            cos, sin = self.rope_cos[positions:], self.rope_sin[positions:]
        elif doc is None:  # (batch, 1, T, head_dim // 2): broadcasts over heads
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
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
            h = layer(h, cos, sin, cache, int(i), mask)
        if self.output is None:
            return h
        return self.output(self.norm(h if select is None else h[:, select]))

    @torch.no_grad()
    def fuse_projections(self) -> Transformer:
        """For inference: wq|wk|wv and w1|w3 each become one weight, so a block runs two
        matmuls where it ran five (a small model's decode step costs per operation, not per
        FLOP). The parameters become views of the fused weights: no second copy, and the
        state dict keeps its names. Not for training: the fused weights take no gradient."""
        for block in self.layers.values():
            att, ffn = block.attention, block.feed_forward
            att.qkv = torch.cat([att.wq.weight, att.wk.weight, att.wv.weight])
            dq, dk = att.wq.out_features, att.wk.out_features
            for lin, part in (
                (att.wq, att.qkv[:dq]),
                (att.wk, att.qkv[dq : dq + dk]),
                (att.wv, att.qkv[dq + dk :]),
            ):
                lin.weight = nn.Parameter(part, requires_grad=False)
            ffn.gate_up = torch.cat([ffn.w1.weight, ffn.w3.weight])
            dh = ffn.w1.out_features
            ffn.w1.weight = nn.Parameter(ffn.gate_up[:dh], requires_grad=False)
            ffn.w3.weight = nn.Parameter(ffn.gate_up[dh:], requires_grad=False)
        return self

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
