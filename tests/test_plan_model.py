"""Planner formulas against hand-computed values from the papers they come from."""

from __future__ import annotations

import math

import pytest

from stratus.errors import StratusError
from stratus.plan import model as M
from stratus.plan.presets import PRESETS, resolve


def gpt(layers, hidden, heads, vocab, seq, tie=True):
    return M.ModelShape("t", "gpt", layers, hidden, heads, heads, 4 * hidden, vocab, seq, tie)


def test_gpt3_175b_has_174_6b_parameters_by_narayanan():
    # 12 l h^2 (1 + 13/(12h) + (V+s)/(12lh)) with l=96, h=12288, V=51200, s=2048
    p = M.narayanan_params(96, 12288, 51200, 2048)
    assert round(p / 1e9, 1) == 174.6
    by_hand = 12 * 96 * 12288**2 * (1 + 13 / (12 * 12288) + (51200 + 2048) / (12 * 96 * 12288))
    assert p == pytest.approx(by_hand, rel=1e-12)
    # the per-matrix count adds only the final LayerNorm (2h) to Narayanan's formula
    assert M.param_count(PRESETS["gpt3-175b"]) == pytest.approx(p + 2 * 12288, rel=1e-12)


@pytest.mark.parametrize(
    "name, billions",
    [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama3-405b", 405.85)],
)
def test_llama3_presets_have_their_published_sizes(name, billions):
    assert M.param_count(PRESETS[name]) / 1e9 == pytest.approx(billions, abs=0.01)


def test_flops_per_iteration_match_korthikanti_and_narayanan():
    # GPT-3 175B, B = 1536 (Narayanan's run): no recompute 72 B s l h^2 (1 + s/6h + V/(12hl)),
    # full recompute 96 B s l h^2 (1 + s/6h + V/(16lh)).
    m, B = PRESETS["gpt3-175b"], 1536
    s, L, h, V = 2048, 96, 12288, 51200
    base = B * s * L * h * h
    assert M.iteration_flops(m, B, "none") == pytest.approx(72 * base * (1 + s / (6 * h) + V / (12 * h * L)))
    assert M.iteration_flops(m, B, "full") == pytest.approx(96 * base * (1 + s / (6 * h) + V / (16 * L * h)))
    # Korthikanti: selective recompute adds only the attention core's forward (4 s h per token per layer)
    extra = M.iteration_flops(m, B, "selective") - M.iteration_flops(m, B, "none")
    assert extra == 4 * s * h * L * B * s
    # by hand: 6 N D + 12 l h s D with N = 174.6e9 and D = 1536 x 2048 tokens is 3.386e18
    tokens = B * s
    by_hand = 6 * 174.6e9 * tokens + 12 * L * h * s * tokens
    assert by_hand == pytest.approx(3.386e18, rel=1e-3)
    assert M.iteration_flops(m, B, "none") == pytest.approx(by_hand, rel=2e-3)


def test_llama_flops_by_hand():
    # 6 (L x block matmul weights + V d) + 12 L d T: llama3-8b at 8k
    m = PRESETS["llama3-8b"]
    block = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336
    assert M.layer_matmul_params(m) == block
    assert M.model_flops_per_token(m) == 6 * (32 * block + 128256 * 4096) + 12 * 32 * 4096 * 8192


def test_one_count_for_the_trainer_and_the_planner():
    """stratus.counts is the trainer's count too: the real model's tensors, and its own
    config read as the planner reads one, agree with the preset; and counts imports no torch,
    so the planner runs where torch is not installed."""
    import subprocess
    import sys

    from stratus.config import ModelConfig
    from stratus.counts import shape_of

    cfg = ModelConfig(
        vocab_size=128256, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336
    )
    m = PRESETS["llama3-8b"]
    assert shape_of(cfg, 8192).__dict__ | {"name": m.name} == m.__dict__
    code = "import sys, stratus.counts, stratus.plan.cost, stratus.plan.search; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_param_count_is_the_real_models():
    import torch  # noqa: F401  (the real model)

    from stratus.config import ModelConfig
    from stratus.counts import shape_of
    from stratus.model import Transformer

    for tied in (False, True):
        cfg = ModelConfig(vocab_size=96, n_layers=3, d_model=48, n_heads=6, n_kv_heads=2, tie_embeddings=tied)
        model = Transformer(cfg)
        assert M.param_count(shape_of(cfg)) == sum(p.numel() for p in model.parameters())


# Korthikanti et al. 2022, Table 2: activation bytes per layer, 16-bit, GPT with dropout.
S, B, H, A, T = 2048, 1, 12288, 96, 8


@pytest.mark.parametrize(
    "tp, recompute, sp, expected",
    [
        (1, "none", True, S * B * H * (34 + 5 * A * S / H)),
        (T, "none", False, S * B * H * (10 + 24 / T + 5 * A * S / (H * T))),
        (T, "none", True, S * B * H / T * (34 + 5 * A * S / H)),
        (T, "selective", True, 34 * S * B * H / T),
        (T, "full", False, 2 * S * B * H),
        (T, "full", True, 2 * S * B * H / T),
    ],
)
def test_korthikanti_activation_memory(tp, recompute, sp, expected):
    m = gpt(96, H, A, 51200, S)
    got = M.activation_bytes_per_layer(m, B, tp, recompute, sequence_parallel=sp, flash_attention=False)
    assert got == pytest.approx(expected, rel=1e-12)


def test_korthikanti_gpt3_example_in_gigabytes():
    # GPT-3 175B, t=8, sequence parallel + selective recompute: 34 s b h / t = 107 MB per layer,
    # 10.3 GB for 96 layers per micro batch in flight (their Figure 7's order of magnitude)
    m = PRESETS["gpt3-175b"]
    per_layer = M.activation_bytes_per_layer(m, 1, 8, "selective", True, False)
    assert per_layer / 1e6 == pytest.approx(107.0, abs=0.1)
    assert 96 * per_layer / 1e9 == pytest.approx(10.3, abs=0.1)


def test_flash_attention_drops_the_score_term():
    m = PRESETS["gpt3-175b"]
    flash = M.activation_bytes_per_layer(m, 1, 1, "none", True, True)
    assert flash == pytest.approx(34 * S * B * H)
    # with flash, selective recompute drops the norm outputs and the MLP activation output
    sel = M.activation_bytes_per_layer(m, 1, 1, "selective", True, True)
    assert sel == pytest.approx((34 - 4 - 8) * S * B * H)


def test_bad_shapes_are_refused():
    with pytest.raises(StratusError, match="--heads 7 must divide --hidden"):
        resolve(None, layers=2, hidden=64, heads=7, seq_len=16, vocab=100)
    with pytest.raises(StratusError, match="missing --vocab"):
        resolve(None, layers=2, hidden=64, heads=8, seq_len=16)
    with pytest.raises(StratusError, match="unknown model"):
        resolve("gpt5")
    assert math.isclose(resolve("llama3-8b", seq_len=4096).seq_len, 4096)


def test_the_trainer_finds_its_mfu_peak_in_the_planners_catalog(tmp_path):
    """One hardware catalog: torch's device names map to the planner's entries."""
    from stratus.plan.catalog import load_catalog

    cat = load_catalog()
    assert cat.gpu_for_device("NVIDIA H100 80GB HBM3", 79.6).peak_flops == 989e12
    assert cat.gpu_for_device("NVIDIA H200", 140.4).key == "h200"
    assert cat.gpu_for_device("NVIDIA A100-SXM4-40GB", 39.4).key == "a100-40gb"
    assert cat.gpu_for_device("NVIDIA A100-SXM4-80GB", 79.2).key == "a100-80gb"
    assert cat.gpu_for_device("Tesla V100-SXM2-32GB", 31.7) is None  # unknown: no MFU, not a guess
    # a site's catalog adds a GPU, and the trainer knows it too
    site = tmp_path / "site.toml"
    site.write_text(
        '[gpu.b200]\nname = "B200"\nbf16_tflops = 2250.0\nhbm_gb = 178.0\nhbm_gbps = 8000.0\n'
        'gemm_fraction = 0.8\nlink = "nvlink4"\ncuda_name = "B200"\n'
    )
    assert load_catalog(site).gpu_for_device("NVIDIA B200", 178.0).peak_flops == 2250e12
