"""`stratus generate`, `eval` and `serve` on what `stratus export --format hf` wrote: the
model read back equals the run's bit for bit, from the stored stratus config or (for older
exports) the Llama fields alone; any other directory is one `stratus: error:` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from stratus.checkpoint.hf_export import export_hf
from stratus.checkpoint.load import load_trained
from stratus.errors import StratusError
from stratus.train.evaluate import evaluate_trained
from tests.conftest import TINY_ARGS, run_cli
from tests.serving import LiveServer, make_export

STEPS = 4
GREEDY = ("--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0")


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its `stratus export --format hf`), through the real CLI."""
    base = tmp_path_factory.mktemp("hf_load")
    run, hf = base / "run", base / "hf"
    r = run_cli("train", f"--data.path={tiny_data}", f"--run.dir={run}", *TINY_ARGS, f"--train.steps={STEPS}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", str(run), "--out", str(hf), "--format", "hf")
    assert r.returncode == 0, r.stderr
    return run, hf


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stratus: error:"), r.stderr
    return lines[0]


def _same_model(a: Path, b: Path) -> None:
    ma, mb = load_trained(a).model, load_trained(b).model
    for name in ("d_model", "n_heads", "kv_heads", "ffn_width", "vocab_size", "tie_embeddings"):
        assert getattr(mb.cfg, name) == getattr(ma.cfg, name), name
    assert {k: v.shape for k, v in mb.state_dict().items()} == {
        k: v.shape for k, v in ma.state_dict().items()
    }
    tokens = torch.randint(
        0, ma.cfg.vocab_size, (2, ma.cfg.max_seq_len), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(mb(tokens), ma(tokens))


def _without_stratus_block(hf: Path, out: Path) -> Path:
    """The directory as `export --format hf` wrote it before config.json carried stratus's config."""
    shutil.copytree(hf, out)
    info = json.loads((out / "config.json").read_text())
    del info["stratus"]
    (out / "config.json").write_text(json.dumps(info))
    return out


def test_generate_from_the_hf_export_matches_the_run(exported):
    run, hf = exported
    a, b = run_cli("generate", str(run), *GREEDY), run_cli("generate", str(hf), *GREEDY)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert b.stdout.startswith("def ") and b.stdout == a.stdout
    assert f"from {hf}]" in b.stderr


def test_logits_equal_the_runs_with_and_without_the_stored_config(exported, tmp_path):
    run, hf = exported
    assert load_trained(hf).step == STEPS
    assert load_trained(hf).model.cfg == load_trained(run).model.cfg  # the stored config, exactly
    _same_model(run, hf)
    old = _without_stratus_block(hf, tmp_path / "old")
    assert load_trained(old).step == 0  # not recorded there
    _same_model(run, old)


def test_tied_embeddings_and_a_default_ffn_width_round_trip(tiny_data, tmp_path):
    # ffn_hidden unset: the width 8/3 d_model rounded up to 256 must come back from intermediate_size
    src = make_export(tmp_path / "tied", tiny_data / "tokenizer.json", tie_embeddings=True)
    hf = export_hf(src, tmp_path / "hf")
    assert "lm_head.weight" not in load_file(hf / "model.safetensors")
    assert load_trained(hf).model.cfg.ffn_width == 256
    _same_model(src, hf)
    _same_model(src, _without_stratus_block(hf, tmp_path / "old"))


def test_eval_on_the_hf_export_needs_data_and_then_matches_the_run(exported, tiny_data):
    run, hf = exported
    line = _one_error_line(run_cli("eval", str(hf)))
    assert "--data" in line
    r = run_cli("eval", str(hf), "--data", str(tiny_data), "--batches", "2", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # an export, knowing no run config, evaluates windows of max_seq_len
    want = evaluate_trained(str(run), str(tiny_data), batches=2, seq_len=64)
    assert got["step"] == STEPS and got["tokens"] == want["tokens"] > 0
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)


def test_serving_the_hf_export(exported):
    _, hf = exported
    server = LiveServer(hf)
    try:
        assert server.model == hf.name
        body = {"model": server.model, "prompt": "def ", "max_tokens": 5, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert 1 <= r.json()["usage"]["completion_tokens"] <= 5
    finally:
        assert server.stop() == 0


@pytest.fixture
def foreign(tmp_path) -> Path:
    """A Hugging Face GPT-2 directory."""
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"transformer.wte.weight": torch.zeros(4, 4)}, d / "model.safetensors")
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.mark.parametrize("verb", [("generate", "--prompt", "x"), ("serve", "--port", "0")])
def test_a_foreign_model_is_one_error_line(foreign, verb):
    line = _one_error_line(run_cli(verb[0], str(foreign), *verb[1:], timeout=120))
    assert "'gpt2'" in line and "stratus export --format hf" in line


def _edit(hf: Path, out: Path, **changes) -> Path:
    shutil.copytree(hf, out)
    info = json.loads((out / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    (out / "config.json").write_text(json.dumps(info))
    return out


def _reweigh(hf: Path, out: Path, changes: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(hf, out)
    save_file({**load_file(hf / "model.safetensors"), **changes}, out / "model.safetensors")
    return out


def test_directories_stratus_cannot_load_say_what_to_give(exported, tmp_path):
    _, hf = exported
    cases = {
        "neither a stratus export nor": _edit(hf, tmp_path / "plain", model_type=None, stratus=None),
        "format stratus-export/9": _edit(hf, tmp_path / "newer", format="stratus-export/9"),
        "plain RoPE only": _edit(
            hf, tmp_path / "llama3", stratus=None, rope_parameters={"rope_type": "llama3", "factor": 8.0}
        ),
        "LlamaForCausalLM": _edit(
            hf, tmp_path / "classifier", architectures=["LlamaForSequenceClassification"]
        ),
        "config.json was edited": _edit(hf, tmp_path / "edited", num_hidden_layers=1),
        "config.json cannot be read": _edit(hf, tmp_path / "broken"),
    }
    (tmp_path / "broken" / "config.json").write_text("{")
    extra = _reweigh(hf, tmp_path / "extra", {"model.layers.9.mlp.gate_proj.weight": torch.ones(32)})
    cases["does not fit its config.json (unexpected model.layers.9"] = extra
    cases["norm.weight is (7,), the config gives (32,)"] = _reweigh(
        hf, tmp_path / "reshaped", {"model.norm.weight": torch.ones(7)}
    )
    for needle, d in cases.items():
        with pytest.raises(StratusError) as e:
            load_trained(d)
        message = str(e.value)
        assert "\n" not in message
        assert needle in message, message
