"""Activation memory per layer and the logits, the planner's formulas beyond the counts
(which live in stratus.counts, shared with the trainer, and are re-exported here for the
cost model's `M.` vocabulary)."""

from __future__ import annotations

from stratus.counts import (  # noqa: F401  (re-exported)
    Arch,
    ModelShape,
    Recompute,
    embedding_params,
    hardware_flops_per_token,
    head_forward_flops_per_token,
    iteration_flops,
    layer_forward_flops_per_token,
    layer_matmul_params,
    layer_params,
    model_flops_per_token,
    narayanan_params,
    param_count,
)

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
