"""Properties of the cost model that must hold for any shape and cluster (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stratus.plan import model as M
from stratus.plan.catalog import load_catalog
from stratus.plan.comm import Group, collective_time
from stratus.plan.cost import Candidate, estimate
from stratus.plan.model import ModelShape

CATALOG = load_catalog(None)
# the cost model's properties, over every sharding level (stratus itself runs ZeRO-3 only)
SW = CATALOG.software("megatron-core")

shapes = st.builds(
    lambda layers, heads, head_dim, kv_div, seq, vocab, arch: ModelShape(
        "h",
        arch,
        layers,
        heads * head_dim,
        heads,
        heads // kv_div,
        (4 if arch == "gpt" else 3) * heads * head_dim,
        vocab,
        seq,
    ),
    layers=st.sampled_from([8, 16, 24, 32]),
    heads=st.sampled_from([8, 16, 32]),
    head_dim=st.sampled_from([64, 128]),
    kv_div=st.sampled_from([1, 2, 8]),
    seq=st.sampled_from([512, 2048, 8192]),
    vocab=st.sampled_from([32000, 128256]),
    arch=st.sampled_from(["gpt", "llama"]),
)
recompute = st.sampled_from(["none", "selective", "full"])
FAST = settings(max_examples=40, deadline=None)


@FAST
@given(m=shapes, tp=st.sampled_from([1, 2, 4, 8]), mb=st.sampled_from([1, 2, 4]), rc=recompute)
def test_larger_micro_batch_never_lowers_activation_memory(m, tp, mb, rc):
    for sp in (True, False):
        for flash in (True, False):
            a = M.activation_bytes_per_layer(m, mb, tp, rc, sp, flash)
            b = M.activation_bytes_per_layer(m, 2 * mb, tp, rc, sp, flash)
            assert b >= a > 0


@FAST
@given(
    m=shapes,
    tp=st.sampled_from([1, 2, 8]),
    zero=st.sampled_from([1, 2, 3]),
    rc=recompute,
    dp=st.sampled_from([2, 4, 8, 16]),
)
def test_more_fsdp_ranks_never_raise_memory_per_gpu(m, tp, zero, rc, dp):
    assume(m.kv_heads % tp == 0)
    # same per-rank work (micro batch 1, 8 micro batches each), more data-parallel ranks sharding the state
    small = CATALOG.cluster(preset="dgx-h100", gpus=tp * dp)
    big = CATALOG.cluster(preset="dgx-h100", gpus=tp * dp * 2)
    e1 = estimate(m, small, SW, Candidate.of(tp, 1, dp, 1, rc, 1, zero), 8 * dp)
    e2 = estimate(m, big, SW, Candidate.of(tp, 1, 2 * dp, 1, rc, 1, zero), 16 * dp)
    assert e2.memory_gb <= e1.memory_gb + 1e-9


@FAST
@given(
    m=shapes,
    tp=st.sampled_from([1, 2, 4, 8]),
    pp=st.sampled_from([1, 2, 4]),
    zero=st.sampled_from([1, 2, 3]),
    nodes=st.sampled_from([1, 2, 4, 16]),
    factor=st.sampled_from([1.5, 2.0, 4.0]),
    which=st.sampled_from(["network", "link", "both"]),
)
def test_more_bandwidth_never_slows_a_step(m, tp, pp, zero, nodes, factor, which):
    cluster = CATALOG.cluster(preset="dgx-h100", nodes=nodes)
    dp = cluster.gpus // (tp * pp)
    assume(m.layers >= pp and dp >= 1 and m.kv_heads % tp == 0)
    lay = Candidate.of(tp, pp, dp, 1, "none", 1, zero)
    faster = cluster
    if which in ("network", "both"):
        faster = replace(
            faster, network=replace(cluster.network, port_gbit=cluster.network.port_gbit * factor)
        )
    if which in ("link", "both"):
        faster = replace(faster, link=replace(cluster.link, gbps_per_gpu=cluster.link.gbps_per_gpu * factor))
    batch = 4 * dp * pp
    slow = estimate(m, cluster, SW, lay, batch).step_time_s
    fast = estimate(m, faster, SW, lay, batch).step_time_s
    assert fast <= slow * (1 + 1e-12)


@FAST
@given(
    nbytes=st.floats(1e3, 1e11),
    size=st.sampled_from([2, 8, 16, 64, 512]),
    per_node=st.sampled_from([1, 2, 8]),
    kind=st.sampled_from(["all_reduce", "reduce_scatter", "all_gather"]),
)
def test_collectives_grow_with_bytes_and_all_reduce_is_the_sum_of_its_halves(nbytes, size, per_node, kind):
    cluster = CATALOG.cluster(preset="dgx-h100", nodes=64)
    g = Group(size, min(per_node, size))
    t1 = collective_time(kind, nbytes, g, cluster)
    assert collective_time(kind, 2 * nbytes, g, cluster) >= t1 > 0
    if g.nodes == 1:  # ring: all-reduce moves exactly reduce-scatter + all-gather
        rs = collective_time("reduce_scatter", nbytes, g, cluster)
        ag = collective_time("all_gather", nbytes, g, cluster)
        ar = collective_time("all_reduce", nbytes, g, cluster)
        assert ar <= rs + ag
