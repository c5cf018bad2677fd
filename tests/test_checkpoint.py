"""Checkpoints: exact round trip, exact resume, damaged ones skipped, shape changes refused,
retention, export."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from stratus.checkpoint.export import export
from stratus.checkpoint.load import load_trained
from stratus.checkpoint.manager import CheckpointManager, list_checkpoints, newest_verified
from stratus.config import ModelConfig, TrainConfig
from stratus.distributed.env import DistEnv
from stratus.errors import StratusError
from stratus.model import Transformer
from stratus.train.loop import train
from stratus.train.optim import build_optimizer
from tests.conftest import metrics, run_cli

CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def _trained_pair():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
    for _ in range(3):
        x = torch.randint(0, 64, (2, 16))
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()
    return cfg, model, opt


def test_save_load_round_trip_is_exact(tmp_path: Path):
    cfg, model, opt = _trained_pair()
    mgr = CheckpointManager(tmp_path / "ck", CPU)
    random.seed(5)
    torch.manual_seed(5)
    path = mgr.save(3, model, opt, {"step": 3, "samples_seen": 6}, {"model": cfg.model_dump()})
    expected_draw = (torch.rand(3), random.random())

    fresh = Transformer(cfg)
    fresh_opt = build_optimizer(fresh, TrainConfig(lr=1e-2), torch.device("cpu"))
    loaded = mgr.load(path, fresh, fresh_opt)
    assert loaded.step == 3 and loaded.trainer["samples_seen"] == 6
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p_old, p_new in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p_old][key], fresh_opt.state[p_new][key]), key
    # the RNG continues where it was at save time
    assert torch.equal(torch.rand(3), expected_draw[0]) and random.random() == expected_draw[1]


def test_checkpoint_with_unflattened_optimizer_state_still_loads(tmp_path: Path):
    """Checkpoints save the optimizer state flat (one entry a parameter, so that pipeline
    stages keep their parameter groups); those saved before, with param_groups as one object,
    load as they were."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from stratus.checkpoint.manager import _flat_optimizer

    cfg, model, opt = _trained_pair()
    mgr = CheckpointManager(tmp_path / "ck", CPU)
    path = mgr.save(3, model, opt, {"step": 3, "samples_seen": 6}, {"model": cfg.model_dump()})
    assert _flat_optimizer(path)
    for f in [*path.glob("*.distcp"), path / ".metadata"]:
        f.unlink()
    model_sd, optim_sd = get_state_dict(model, opt)  # the old, unflattened layout
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=True)
    assert not _flat_optimizer(path)

    fresh = Transformer(cfg)
    fresh_opt = build_optimizer(fresh, TrainConfig(lr=5e-3), torch.device("cpu"))
    mgr.load(path, fresh, fresh_opt)
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    for p_old, p_new in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p_old, p_new)
        assert torch.equal(opt.state[p_old]["exp_avg_sq"], fresh_opt.state[p_new]["exp_avg_sq"])


def test_resumed_run_matches_uninterrupted_run_exactly(tiny_config):
    whole = train(tiny_config("whole", train__steps=8))
    first = train(tiny_config("parts", train__steps=8, train__stop_at=4))
    assert first.step == 4
    second = train(tiny_config("parts", train__steps=8))
    assert second.resumed_from == 4 and second.step == 8
    a, b = metrics(whole.run_dir), metrics(second.run_dir)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in a] == [
        (r["loss"], r["grad_norm"], r["lr"]) for r in b
    ]
    wa = load_trained(whole.run_dir).model.state_dict()
    wb = load_trained(second.run_dir).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_truncated_newest_checkpoint_falls_back_to_previous(tiny_config):
    s = train(tiny_config(train__steps=8))
    root = s.run_dir / "checkpoints"
    assert [step for step, _ in list_checkpoints(root)] == [8, 4]
    shard = next((root / "step-00000008").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    warnings = Collect()
    logging.getLogger("stratus.checkpoint").addHandler(warnings)
    try:
        step, _ = newest_verified(root)
    finally:
        logging.getLogger("stratus.checkpoint").removeHandler(warnings)
    assert step == 4
    assert any("step-00000008" in w and "bytes" in w for w in warnings.lines), warnings.lines
    assert load_trained(s.run_dir).step == 4  # generate/eval/export use the good one too
    resumed = train(tiny_config(train__steps=8))
    assert resumed.resumed_from == 4 and resumed.step == 8
    assert newest_verified(root)[0] == 8  # re-saved whole


def test_directory_without_manifest_is_ignored(tiny_config):
    s = train(tiny_config(train__steps=4))
    root = s.run_dir / "checkpoints"
    junk = root / "step-00000099"
    junk.mkdir()
    (junk / "__0_0.distcp").write_bytes(b"half written")
    (root / ".tmp-step-00000050").mkdir()
    assert newest_verified(root)[0] == 4
    assert train(tiny_config(train__steps=6)).resumed_from == 4


def test_changed_model_shape_is_refused_naming_keys(tiny_config, tmp_path: Path):
    s = train(tiny_config(train__steps=2))
    with pytest.raises(StratusError, match=r"model\.n_layers.*checkpoint 2, config 3"):
        train(tiny_config(train__steps=4, model__n_layers=3))
    r = run_cli(
        "train",
        f"--data.path={tiny_config().data.path}",
        f"--run.dir={s.run_dir}",
        "--model.n_layers=2",
        "--model.d_model=48",
        "--model.n_heads=4",
        "--model.max_seq_len=64",
        "--data.seq_len=32",
        "--train.steps=4",
    )
    assert r.returncode == 2 and "model.d_model" in r.stderr and "Traceback" not in r.stderr


def test_resume_on_data_with_another_tokenizer_is_refused(tiny_config, tmp_path: Path):
    from stratus.data.prepare import prepare
    from tests.conftest import write_corpus

    s = train(tiny_config(train__steps=2))
    other = tmp_path / "other"
    prepare([str(write_corpus(tmp_path / "c", 30))], other, vocab_size=310, say=lambda _: None)
    with pytest.raises(StratusError, match="tokenizer differs"):
        train(tiny_config(train__steps=4, data__path=str(other)))
    assert (s.run_dir / "config.toml").read_text().count(str(other)) == 0  # nothing rewritten


def test_resume_never_refuses_existing_run(tiny_config):
    train(tiny_config(train__steps=2))
    with pytest.raises(StratusError, match="already has a checkpoint"):
        train(tiny_config(train__steps=4, checkpoint__resume="never"))


def test_retention_keeps_newest_and_every_nth(tiny_config):
    s = train(
        tiny_config(train__steps=10, checkpoint__interval=2, checkpoint__keep=2, checkpoint__keep_every=4)
    )
    root = s.run_dir / "checkpoints"
    assert sorted(step for step, _ in list_checkpoints(root)) == [4, 8, 10]
    assert (root / "latest").read_text().strip() == "10"


def test_export_loads_with_identical_logits(tiny_config, tmp_path: Path):
    s = train(tiny_config(train__steps=2, model__tie_embeddings=True))
    out = export(s.run_dir, tmp_path / "exported")
    # the chat template (here a base model's transcript) travels with the tokenizer
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    a, b = load_trained(s.run_dir).model, load_trained(out).model
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert b.output.weight is b.tok_embeddings.weight
    with pytest.raises(StratusError, match="--force"):
        export(s.run_dir, out)
