"""Parameter and FLOP counts from the config alone (no torch), shared with the planner.

FLOPs per token follow Korthikanti et al. (2022), which is PaLM's 6N + 12·L·d·T with the
output projection counted as the real matmul it is:

    flops_per_token = 6 · (N_non_embedding + V·d) + 12 · L · d · T

forward + backward, no recompute; T = sequence length (the attention term counts the full
T×T score matrix, as PaLM does, not the causal half).
"""

from __future__ import annotations

from stratus.config import ModelConfig


def block_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + cfg.n_heads * hd * d
    mlp = 3 * d * cfg.ffn_width
    norms = 2 * d
    return attention + mlp + norms


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """All parameters, or (embeddings=False) all but the token embedding and the output matrix."""
    non_embedding = cfg.n_layers * block_params(cfg) + cfg.d_model  # + final norm
    if not embeddings:
        return non_embedding
    embedding = cfg.vocab_size * cfg.d_model
    return non_embedding + embedding * (1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs (forward + backward) per trained token at this sequence length."""
    matmul_params = param_count(cfg, embeddings=False) + cfg.vocab_size * cfg.d_model
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * seq_len
