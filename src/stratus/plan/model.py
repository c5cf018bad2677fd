"""A model's shape and its parameter, FLOP and activation-memory formulas (no torch).

Two families: "gpt" (GPT-2/3 and Megatron's benchmark models: LayerNorm, GELU MLP of 4h,
biases, learned positions, dropout) and "llama" (RMSNorm, SwiGLU, grouped-query attention,
RoPE, no biases or dropout), the family stratus trains. For "llama" the counts agree with
stratus.model.counts (a test holds them together); this file repeats them per layer because
the cost model needs each matrix's shape, not only the total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from stratus.errors import StratusError

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


def param_count(m: ModelShape) -> int:
    final_norm = 2 * m.hidden if m.arch == "gpt" else m.hidden
    return m.layers * layer_params(m) + final_norm + embedding_params(m)


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


# --- activation memory ---------------------------------------------------------------------


def activation_bytes_per_layer(
    m: ModelShape,
    micro_batch: int,
    tp: int,
    recompute: Recompute,
    sequence_parallel: bool = True,
    flash_attention: bool = True,
) -> float:
    """Bytes one block keeps for backward per micro batch, 16-bit activations (Korthikanti Table 2,
    generalised to GQA and SwiGLU). For a GPT with dropout: s b h (34 + 5 a s / h) unsplit.

    Without flash attention "selective" is Korthikanti's (recompute the attention core); with it,
    the norms and the MLP activation function are recomputed instead (see docs/planning.md)."""
    s, b, h, a = m.seq_len, micro_batch, m.hidden, m.heads
    sbh = s * b * h
    if recompute == "full":  # only the block's input; split over TP ranks only with SP
        return 2 * sbh / (tp if sequence_parallel else 1)
    kv = m.kv_heads / a
    f = m.ffn_hidden / h
    if (
        m.arch == "gpt"
    ):  # norm in, qkv in, Q, K, V, proj in, dropout mask | norm in, fc1 in, gelu in, fc2 in, mask
        attn, mlp, replicated = 2 + 2 + 2 + 4 * kv + 2 + 1, 2 + 2 + 4 * f + 1, 2 + 1 + 2 + 1 + 4
    else:  # norm in, qkv in, Q, K, V, proj in | norm in, w1/w3 in, w1 out, w3 out, w2 in
        attn, mlp, replicated = 2 + 2 + 2 + 4 * kv + 2, 2 + 2 + 6 * f, 2 + 2 + 2 + 2
    # `replicated` (norm inputs, dropout masks, the inputs of the first matmuls) is what stays
    # whole on every TP rank without sequence parallelism: Korthikanti's 10 of 34.
    if recompute == "selective" and flash_attention:
        # flash attention already keeps no scores, so selective recompute takes the next cheapest
        # things: the norms' outputs (the inputs of QKV and the MLP) and the MLP activation function
        attn, mlp, replicated = attn - 2, mlp - 2 - 2 * f, replicated - 4
    split = attn + mlp - replicated
    per_sbh = (attn + mlp) / tp if sequence_parallel else replicated + split / tp
    scores = 0.0
    if not flash_attention and recompute != "selective":
        per_head = 5 if m.arch == "gpt" else 2  # softmax out (2) [+ dropout mask (1) + output (2)]
        scores = per_head * a * s * s * b / tp
    return per_sbh * sbh + scores


def logits_bytes(m: ModelShape, micro_batch: int, tp: int) -> float:
    """fp32 logits of one micro batch on the last stage, vocabulary split over TP ranks."""
    return 4.0 * m.seq_len * micro_batch * m.vocab / tp
