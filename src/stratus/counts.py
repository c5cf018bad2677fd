"""A model's shape and its parameter and FLOP counts: the one implementation, without torch,
that the trainer (MFU, the parameter count it logs), the dry run and the planner all use.

Two families: "gpt" (GPT-2/3 and Megatron's benchmark models: LayerNorm, GELU MLP of 4h,
biases, learned positions, dropout) and "llama" (RMSNorm, SwiGLU, grouped-query attention,
RoPE, no biases or dropout), the family stratus trains (`shape_of` turns its [model] into a
shape). Counts are per matrix, because the planner's cost model needs each one's shape.

FLOPs follow Korthikanti et al. (2022): matmuls only, forward + backward = 3 x forward, the
output projection counted as the real matmul it is, attention over all T keys (the full T x T
score matrix, as PaLM and Megatron count it, not the causal half). For a llama that is
6 (L x block matmul weights + V d) + 12 L d T per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from stratus.errors import StratusError

if TYPE_CHECKING:
    from stratus.config import ModelConfig

Arch = Literal["gpt", "llama"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    arch: Arch
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len"):
            if getattr(self, field) < 1:
                raise StratusError(f"model {field} must be at least 1 (got {getattr(self, field)})")
        if self.hidden % self.heads:
            raise StratusError(f"--heads {self.heads} must divide --hidden {self.hidden}")
        if self.heads % self.kv_heads:
            raise StratusError(f"--kv-heads {self.kv_heads} must divide --heads {self.heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gated(self) -> bool:
        """SwiGLU has three MLP matrices, GELU two."""
        return self.arch == "llama"

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = param_count(self)
        d["params_b"] = round(param_count(self) / 1e9, 2)
        return d


def shape_of(cfg: ModelConfig, seq_len: int | None = None) -> ModelShape:
    """A stratus [model] as a llama-family shape, at seq_len (default: its max_seq_len)."""
    return ModelShape(
        "stratus",
        "llama",
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.kv_heads,
        cfg.ffn_width,
        cfg.vocab_size,
        seq_len or cfg.max_seq_len,
        cfg.tie_embeddings,
    )


@lru_cache(maxsize=64)
def model_config_of(m: ModelShape) -> ModelConfig:
    """The stratus [model] of a llama-family shape (shape_of's inverse)."""
    from stratus.config import ModelConfig  # pydantic, no torch: imported when asked for

    return ModelConfig(
        vocab_size=m.vocab,
        n_layers=m.layers,
        d_model=m.hidden,
        n_heads=m.heads,
        n_kv_heads=m.kv_heads,
        ffn_hidden=m.ffn_hidden,
        max_seq_len=m.seq_len,
        tie_embeddings=m.tie_embeddings,
    )


# --- parameters ----------------------------------------------------------------------------


def layer_matmul_params(m: ModelShape) -> int:
    """Weights of the matrices in one block (what the GEMMs multiply by)."""
    h = m.hidden
    attention = h * (h + 2 * m.kv_dim) + h * h
    mlp = (3 if m.gated else 2) * h * m.ffn_hidden
    return attention + mlp


def layer_params(m: ModelShape) -> int:
    h = m.hidden
    # gpt: biases (qkv 3h, proj h, fc1 f, fc2 h) and two LayerNorms (2h each); llama: two RMSNorm gains
    small = 3 * h + h + m.ffn_hidden + h + 4 * h if m.arch == "gpt" else 2 * h
    return layer_matmul_params(m) + small


def embedding_params(m: ModelShape) -> int:
    """Token embedding, learned positions (gpt), and the output matrix unless tied."""
    tokens = m.vocab * m.hidden
    positions = m.seq_len * m.hidden if m.arch == "gpt" else 0
    return tokens * (1 if m.tie_embeddings else 2) + positions


def param_count(m: ModelShape, embeddings: bool = True) -> int:
    """All parameters, or (embeddings=False) all but the token and position embeddings and the
    output matrix."""
    final_norm = 2 * m.hidden if m.arch == "gpt" else m.hidden
    non_embedding = m.layers * layer_params(m) + final_norm
    return non_embedding + (embedding_params(m) if embeddings else 0)


def narayanan_params(layers: int, hidden: int, vocab: int, seq_len: int) -> float:
    """Narayanan et al. (SC21): P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)) for a GPT, tied embeddings."""
    lh = layers * hidden
    return 12 * lh * hidden * (1 + 13 / (12 * hidden) + (vocab + seq_len) / (12 * lh))


# --- FLOPs ---------------------------------------------------------------------------------


def layer_forward_flops_per_token(m: ModelShape) -> int:
    """Matmul FLOPs of one block's forward pass per token, attention over all s keys (no causal half)."""
    return 2 * layer_matmul_params(m) + 4 * m.seq_len * m.hidden


def head_forward_flops_per_token(m: ModelShape) -> int:
    return 2 * m.hidden * m.vocab


def model_flops_per_token(m: ModelShape) -> int:
    """Forward + backward model FLOPs per token, recompute not counted: the MFU numerator.
    For a GPT this is Korthikanti Eq. 7 divided by B s: 72 l h^2 (1 + s/(6h) + V/(12 h l))."""
    return 3 * (m.layers * layer_forward_flops_per_token(m) + head_forward_flops_per_token(m))


Recompute = Literal["none", "selective", "full"]


def hardware_flops_per_token(m: ModelShape, recompute: Recompute) -> int:
    """What the hardware computes: full recompute adds one forward of every block (Narayanan Eq. 3);
    selective adds the attention core's forward (Korthikanti)."""
    extra = 0
    if recompute == "full":
        extra = m.layers * layer_forward_flops_per_token(m)
    elif recompute == "selective":
        extra = m.layers * 4 * m.seq_len * m.hidden
    return model_flops_per_token(m) + extra


def iteration_flops(m: ModelShape, global_batch: int, recompute: Recompute = "none") -> int:
    return global_batch * m.seq_len * hardware_flops_per_token(m, recompute)
