"""The training loop learns, and gradient accumulation is the same update as a bigger batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stratus.checkpoint.load import load_trained
from stratus.errors import StratusError
from stratus.train.loop import train
from tests.conftest import metrics


def test_tiny_model_overfits_tiny_corpus(tiny_config):
    cfg = tiny_config(
        model__d_model=64,
        train__steps=150,
        train__lr=1e-2,
        train__min_lr=1e-3,
        train__warmup_steps=10,
        train__micro_batch=8,
        train__weight_decay=0.0,
        log__interval=10,
        checkpoint__interval=0,
        eval__interval=150,
        eval__batches=4,
    )
    summary = train(cfg)
    losses = [r["loss"] for r in metrics(summary.run_dir)]
    # the corpus is 24 repetitive documents; a model that learns goes far below the
    # unigram baseline (about 4 nats here)
    assert summary.unigram_baseline > 3.0
    assert losses[-1] < 1.0 < losses[0], losses
    assert summary.val_loss is not None and summary.val_loss < summary.unigram_baseline


def test_accumulation_equals_one_big_batch(tiny_config):
    big = train(tiny_config("big", train__micro_batch=8, train__global_batch=8, train__steps=3))
    acc = train(tiny_config("acc", train__micro_batch=2, train__global_batch=8, train__steps=3))
    a, b = metrics(big.run_dir), metrics(acc.run_dir)
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4, abs=1e-6)
    wa, wb = load_trained(big.run_dir).model.state_dict(), load_trained(acc.run_dir).model.state_dict()
    for key in wa:  # Adam normalizes tiny gradients, so compare at a fraction of one lr-sized update
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5)


def test_metrics_and_run_directory(tiny_config):
    s = train(tiny_config(train__steps=4, log__interval=3, eval__interval=2, eval__batches=2))
    rows = [json.loads(x) for x in (s.run_dir / "metrics.jsonl").read_text().splitlines()]
    # one line per logged or evaluated step, each with the step and its training loss
    assert [r["step"] for r in rows] == [2, 3, 4]
    assert all(isinstance(r["loss"], float) for r in rows)
    logged = [r for r in rows if r["step"] in (3, 4)]
    for key in ("lr", "grad_norm", "tokens_per_s", "memory_gb", "tokens_seen"):
        assert all(r[key] is not None for r in logged), key
    assert logged[-1]["tokens_seen"] == 4 * 4 * 32
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    for name in ("config.toml", "tokenizer.json", "train.log", "checkpoints/latest"):
        assert (s.run_dir / name).is_file(), name
    assert "step 4/4" in (s.run_dir / "train.log").read_text()


def test_tensorboard_events_are_written(tiny_config):
    s = train(tiny_config(train__steps=2, log__tensorboard=True))
    assert any(p.name.startswith("events.out.tfevents") for p in (s.run_dir / "events").iterdir())


def test_inconsistent_batch_and_vocab_are_refused(tiny_config):
    with pytest.raises(StratusError, match="train.global_batch"):
        train(tiny_config(train__micro_batch=3, train__global_batch=8))
    with pytest.raises(StratusError, match="model.vocab_size"):
        train(tiny_config(model__vocab_size=100))


def test_learning_rate_schedule(tiny_config, tmp_path: Path):
    from stratus.train.optim import lr_multiplier

    f = lr_multiplier(
        tiny_config(train__steps=100, train__warmup_steps=10, train__lr=1.0, train__min_lr=0.1).train
    )
    assert f(0) < f(5) < f(9) <= 1.0  # warmup rises
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)  # half-way through the cosine: midpoint of lr and min_lr
    assert f(100) == pytest.approx(0.1)
