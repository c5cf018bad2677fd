"""Memory per GPU as stratus holds it (`--software stratus`): FSDP2 with bf16 compute and fp32
master weights, stratus's activation-checkpoint policies, and the moment the step peaks.

Counted from what the code keeps, tensor by tensor (docs/planning.md lists them), and checked
against the dry run of the real code (tests/test_plan_memory.py), not fitted to it.

The peak of a step without pipelining is the start of the loss's backward: every block's
saved activations are still held, the output layer's too, and the cross-entropy's backward
has two fp32 buffers the size of the logits. At a 128k vocabulary these last are the
largest single item (8 bytes x 128,256 = 1 MB a token).
"""

from __future__ import annotations

from stratus.counts import ModelShape, layer_params, param_count
from stratus.distributed.layout import Layout, split_layers
from stratus.plan.efficiency import DEFAULT, Efficiency

GIB = 2**30


def block_activation_bytes(m: ModelShape, tp: int, recompute: str, a: int = 2) -> float:
    """Bytes one block keeps for its backward, per token of a micro batch, on one of `tp`
    ranks (sequence parallel: what runs on sequence shards is divided by tp, and so are the
    head- and MLP-sharded tensors; the gathered inputs of column-parallel matmuls and the
    full-sequence partial outputs of row-parallel ones are not). `a` bytes an element at the
    compute dtype (bf16 2, fp32 4); the norms' statistics and attention's lse are fp32 always."""
    h, kv, f, heads, t = m.hidden, m.kv_dim, m.ffn_hidden, m.heads, tp
    lse = 4 * heads  # attention's log-sum-exp, fp32 per head
    if recompute == "full":
        return a * h / t  # the block's input; everything else is recomputed
    if recompute == "selective":
        # parallelize._SAVE: every matmul's and attention's output. Column-parallel q, k, v,
        # w1, w3 and attention's output (+ lse) are sharded; the row-parallel wo and w2
        # outputs are whole-sequence partial sums before their reduce-scatter.
        sharded = a * (h + h + kv + kv + f + f) + lse  # input, q, out, k, v, w1, w3
        row_outputs = a * (h + h)
        return sharded / t + row_outputs
    # none: two RMSNorms in fp32 (input and normalized, + rstd) on sequence shards; the
    # gathered inputs of q/k/v and of w1/w3; attention's q, k, v, output and lse; wo's input;
    # w1's and w3's outputs, SiLU's output and w2's input.
    norms = 2 * (4 * h + 4 * h + 4)
    gathered = a * (h + h)
    sharded = a * (h + kv + kv + h + h + 4 * f) + lse
    return norms / t + gathered + sharded / t


def head_activation_bytes(m: ModelShape, tp: int, loss_parallel: bool, a: int = 2) -> float:
    """The output layer's saved tensors per token: the final norm (fp32, sequence shards), its
    output gathered for the output projection, and the fp32 log-softmax the loss keeps."""
    vocab = m.vocab / (tp if loss_parallel else 1)
    return (8 * m.hidden + 4) / tp + a * m.hidden + 4 * vocab


def loss_backward_bytes(m: ModelShape, tp: int, loss_parallel: bool) -> float:
    """The cross-entropy's backward per token: two fp32 buffers the size of the logits, three
    of a vocabulary shard under loss parallelism (its softmax is built from the shards'
    partial sums, and the exponentials are a buffer of their own)."""
    return 12.0 * m.vocab / tp if loss_parallel else 8.0 * m.vocab


def stratus_memory(
    m: ModelShape,
    layout: Layout,
    micro_batch: int,
    recompute: str,
    accum: int,
    loss_parallel: bool = False,
    eff: Efficiency = DEFAULT,
    act_bytes: int = 2,
) -> dict[str, float]:
    """GiB per GPU by the dry run's categories, plus the allowance and the total, for a layout
    without pipelining (FSDP or HSDP, TP+SP); activations at `act_bytes` an element (bf16 on
    a GPU, fp32 on a CPU)."""
    t, shards = layout.tp, layout.dp_shard
    P = param_count(m)
    local = P / (t * shards)  # each rank's shard of every parameter (HSDP: of its replica's)
    rope = 4 * m.seq_len * m.head_dim  # the cos and sin tables, fp32
    tokens = micro_batch * m.seq_len
    acts = tokens * (
        m.layers * block_activation_bytes(m, t, recompute, act_bytes)
        + head_activation_bytes(m, t, loss_parallel, act_bytes)
    )
    parts = {
        "parameters": 4 * local + rope,  # fp32 master shards; bf16 copies exist only per block in use
        # the second micro batch starts holding the first one's reduce-scattered fp32 gradients
        "gradients": 4 * local if accum > 1 else 0.0,
        "optimizer": 8 * local,  # AdamW's two fp32 moments
        "activations": acts,
        "temporaries": tokens * loss_backward_bytes(m, t, loss_parallel),
    }
    return _with_allowance({k: v / GIB for k, v in parts.items()}, eff)


def _with_allowance(held: dict[str, float], eff: Efficiency) -> dict[str, float]:
    dynamic = sum(held.values())
    allowance = eff.reserved_gb + eff.fragmentation * dynamic
    return {**held, "allowance": allowance, "total": dynamic + allowance}


def in_flight(schedule: str, rank: int, pp: int, v: int, per_round: int) -> tuple[float, bool]:
    """How many micro batches' worth of its layers' activations a pipeline rank holds at its
    peak, and whether a backward has run by then, by the rules of torch's schedules
    (pipelining/schedules.py): GPipe runs every forward of the round first; 1F1B warms up with
    pp - 1 - rank forwards; interleaved 1F1B with (v - 1) micro batches a round + 2 (pp - 1 -
    rank) chunk forwards, each chunk a v-th of the rank's layers. (For rank 0 that is
    Korthikanti's pp (1 + (pp - 1)/(pp v)); for the last rank, far more than 1F1B's one.)"""
    if schedule == "gpipe":  # its first backward starts with the whole round held
        return float(per_round), True
    if v == 1:
        held = min(pp - rank, per_round)
        return float(held), per_round > held
    rounds = max(1, per_round // pp)
    chunks = min((v - 1) * (per_round // rounds) + 2 * (pp - 1 - rank) + 1, per_round * v)
    return chunks / v, per_round * v > chunks


def stratus_pipeline_memory(
    m: ModelShape,
    layout: Layout,
    micro_batch: int,
    recompute: str,
    per_round: int,
    schedule: str,
    eff: Efficiency = DEFAULT,
    act_bytes: int = 2,
) -> dict[str, float]:
    """GiB per GPU on the fuller of the first and the last pipeline rank (pipeline_ranks),
    plus the allowance and the total."""
    ranks = pipeline_ranks(m, layout, micro_batch, recompute, per_round, schedule, act_bytes)
    return _with_allowance(max(ranks, key=lambda r: sum(r.values())), eff)


def pipeline_ranks(
    m: ModelShape,
    layout: Layout,
    micro_batch: int,
    recompute: str,
    per_round: int,
    schedule: str,
    a: int = 2,
) -> list[dict[str, float]]:
    """GiB by category on the first and on the last pipeline rank, FSDP under a
    pipeline as stratus runs it: a stage keeps its blocks' bf16 parameters gathered through a
    round and accumulates their whole fp32 gradients until the round's last backward (FSDP
    reduce-scatters once a round). The last stage also keeps each micro batch's bf16 logits
    until its backward, and every stage a receive buffer per micro batch of the round. The
    micro batches in flight are the schedule's (in_flight)."""
    t, shards, pp = layout.tp, layout.dp_shard, layout.pp
    bounds = split_layers(m.layers, layout.stages)
    embed = m.vocab * m.hidden
    tokens = micro_batch * m.seq_len
    block = block_activation_bytes(m, t, recompute, a)
    ranks = []
    for rank, own in ((0, range(0, layout.stages, pp)), (pp - 1, range(pp - 1, layout.stages, pp))):
        first = rank == 0
        layers = sum(len(bounds[s]) for s in own)  # the rank's stages (a loop: r, r + pp, ...)
        params = layers * layer_params(m) + embed + (0 if first else m.hidden)
        held, steady = in_flight(schedule, rank, pp, layout.stages_per_rank, per_round)
        acts = tokens * held * layers * block
        # torch's stage allocates a receive buffer per micro batch of the round up front, for
        # the hidden states (every stage but the first) and for their gradients (every stage
        # but the last), and keeps them through the round: bf16, sequence-sharded over tp
        boundaries = sum((s > 0) + (s < layout.stages - 1) for s in own)
        acts += per_round * boundaries * tokens * a * m.hidden / t
        temps, grads = 0.0, 4 * params / t if steady else 0.0
        if not first:
            # the last stage's micro batches in flight: all of a round under GPipe, else one
            logits = per_round if schedule == "gpipe" else 1
            acts += tokens * logits * (head_activation_bytes(m, t, False, a) + a * m.vocab)
            temps = tokens * loss_backward_bytes(m, t, False)
            if schedule == "gpipe":
                # the round's first backward starts at the loss, whose buffers are freed
                # before the stage's gradients are made: the peak holds the larger of the two
                temps, grads = max(temps - grads, 0.0), min(temps, grads)
        elif steady:
            # the embedding's gradient before it is accumulated, whole-vocabulary on every TP
            # rank: DTensor has no vocabulary-sharded strategy for the embedding's backward
            # (_ops/_embedding_ops.py), so under sequence parallelism it makes a Partial of the
            # whole table and reduce-scatters it to this rank's rows
            temps = 4 * embed
        parts = {
            "parameters": 4 * params / (t * shards) + a * params / t + 4 * m.seq_len * m.head_dim,
            "gradients": grads,
            "optimizer": 8 * params / (t * shards),
            "activations": acts,
            "temporaries": temps,
        }
        ranks.append({k: b / GIB for k, b in parts.items()})
    return ranks
