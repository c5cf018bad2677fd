"""The config tree: TOML + dotted overrides over defaults, round-trips, and the CLI's one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from stratus.config import Config, load_config, parse_overrides, to_toml
from stratus.errors import StratusError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"


# --- in process ------------------------------------------------------------------------------


def test_defaults_without_file():
    cfg = load_config()
    assert cfg.model_dump() == Config().model_dump()
    assert cfg.train.steps == Config.model_fields["train"].default_factory().steps


def test_layers_overrides_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[model]\nd_model = 64\nn_heads = 4\n\n[train]\nsteps = 50\nlr = 1e-3\n\n[run]\ndir = "runs/x"\n'
    )
    defaults = Config()
    cfg = load_config(f, {"train.steps": 7, "model.n_layers": 3})
    assert cfg.train.steps == 7  # override beats file
    assert cfg.model.n_layers == 3  # override beats default
    assert cfg.model.d_model == 64 and cfg.model.n_heads == 4  # file beats default
    assert cfg.train.lr == 1e-3
    assert cfg.run.dir == "runs/x"
    assert cfg.train.seed == defaults.train.seed  # untouched keys keep their defaults
    assert cfg.data == defaults.data
    # the file itself is unchanged by overrides, and loading it alone gives the file's values
    assert load_config(f).train.steps == 50


def test_demo_config_loads():
    cfg = load_config(DEMO, parse_overrides(["--train.steps=7"]))
    assert cfg.train.steps == 7
    on_disk = tomllib.loads(DEMO.read_text())["model"]
    assert cfg.model.d_model == on_disk["d_model"] and cfg.model.tie_embeddings is on_disk["tie_embeddings"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--a.b=1"], {"a.b": 1}),
        (["--a.b", "1"], {"a.b": 1}),
        (["--train.lr=3e-4"], {"train.lr": 3e-4}),
        (["--train.lr", "0.5"], {"train.lr": 0.5}),
        (["--x.y=true", "--x.z", "false"], {"x.y": True, "x.z": False}),
        (["--x.y=none", "--x.z=None", "--x.w", "null"], {"x.y": None, "x.z": None, "x.w": None}),
        (["--run.dir=runs/a b"], {"run.dir": "runs/a b"}),  # not TOML: a plain string
        (['--run.dir="quoted"'], {"run.dir": "quoted"}),  # a TOML string
        (["--a.b=x=y"], {"a.b": "x=y"}),  # only the first = separates key and value
        (["--a.b.c=-2"], {"a.b.c": -2}),
        (["--a.b=1", "--c.d", "two", "--e.f=3.5"], {"a.b": 1, "c.d": "two", "e.f": 3.5}),
        ([], {}),
    ],
)
def test_parse_overrides(args, expected):
    got = parse_overrides(args)
    assert got == expected
    for k, v in expected.items():  # 1 and 1.0, True and 1 compare equal: check the types too
        assert type(got[k]) is type(v)


@pytest.mark.parametrize("args", [["train.steps=3"], ["--steps=3"], ["--train.steps"], ["-x.y=1"]])
def test_parse_overrides_rejects(args):
    with pytest.raises(StratusError):
        parse_overrides(args)


def test_to_toml_round_trip(tmp_path):
    overrides = {
        "model.vocab_size": 128,
        "model.n_kv_heads": 2,
        "model.ffn_hidden": 100,
        "model.tie_embeddings": True,
        "model.norm_eps": 1e-6,
        "train.lr": 3e-4,
        "train.min_lr": 1.5e-5,
        "train.dtype": "bfloat16",
        "log.peak_tflops": 312.5,
        "run.dir": 'runs/with "quotes" \\ and ünïcode',
    }
    cfg = load_config(None, overrides)
    for commented in (False, True):
        f = tmp_path / f"c{int(commented)}.toml"
        f.write_text(to_toml(cfg, comments=commented), encoding="utf-8")
        again = load_config(f)
        assert again.model_dump() == cfg.model_dump()
        assert again.hash() == cfg.hash()
    # defaults round-trip too, including the keys whose value is none
    f = tmp_path / "d.toml"
    f.write_text(to_toml(Config()), encoding="utf-8")
    assert load_config(f).model_dump() == Config().model_dump()


def test_to_toml_comments_carry_descriptions():
    text = to_toml(Config(), comments=True)
    desc = Config.model_fields["train"].annotation.model_fields["steps"].description
    assert re.search(r"^steps = \d+ +# " + re.escape(desc) + "$", text, re.M)
    for line in to_toml(Config(), comments=False).splitlines():  # plain: no trailing descriptions
        assert re.fullmatch(r"|\[\w+\]|\w+ = [^#]+|# \w+ = none", line), line


def test_hash_changes_with_any_value():
    base = load_config()
    assert base.hash() == load_config().hash()  # stable
    assert re.fullmatch(r"[0-9a-f]{16}", base.hash())
    seen = {base.hash()}
    for key, value in [
        ("train.steps", 999),
        ("model.n_layers", 2),
        ("run.dir", "elsewhere"),
        ("train.lr", 1e-3),
    ]:
        h = load_config(None, {key: value}).hash()
        assert h not in seen, key
        seen.add(h)


def test_in_process_errors_name_the_key(tmp_path):
    cases = {
        "train.stepz": ({"train.stepz": 1}, "train.stepz"),
        "type": ({"train.steps": "abc"}, "train.steps"),
        "range": ({"train.lr": -1}, "train.lr"),
        "heads": ({"model.n_heads": 5}, "model.n_heads"),
        "seq": ({"data.seq_len": 5000}, "data.seq_len"),
        "min_lr": ({"train.min_lr": 1.0, "train.lr": 0.1}, "train.min_lr"),
        "kv": ({"model.n_kv_heads": 4}, "model.n_kv_heads"),  # 4 does not divide the default 6 heads
    }
    for name, (overrides, key) in cases.items():
        with pytest.raises(StratusError) as e:
            load_config(None, overrides)
        msg = str(e.value)
        assert key in msg, name
        assert "\n" not in msg, name


# --- through the real CLI --------------------------------------------------------------------


def stratus(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stratus", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_config_show_applies_override():
    r = stratus("config", "show", "configs/demo.toml", "--train.steps=7", "--model.n_layers", "3")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^steps = 7\b", r.stdout, re.M)
    assert re.search(r"^n_layers = 3\b", r.stdout, re.M)
    d_model = tomllib.loads(DEMO.read_text())["model"]["d_model"]
    assert re.search(rf"^d_model = {d_model}\b", r.stdout, re.M)  # from the file
    assert "Traceback" not in r.stderr


BAD_TOML_KEY = "[train]\nstepz = 3\n"
MALFORMED = "[train\nsteps = = 3\n"


@pytest.mark.parametrize(
    "verb, args, files, must_name",
    [
        ("show", ["--train.stepz=1"], {}, "train.stepz"),
        ("show", ["--foo.bar=1"], {}, "foo"),
        ("show", ["--train.steps=abc"], {}, "train.steps"),
        ("show", ["--train.lr=-1"], {}, "train.lr"),
        ("show", ["--model.n_heads=5"], {}, "model.n_heads"),
        ("show", ["--data.seq_len=5000"], {}, "data.seq_len"),
        ("show", [], {"bad.toml": BAD_TOML_KEY}, "train.stepz"),
        ("show", [], {"bad.toml": MALFORMED}, "bad.toml"),
        ("show", ["MISSING"], {}, "missing.toml"),
        ("train", ["--train.stepz=1"], {}, "train.stepz"),
        ("train", ["--model.n_heads", "5"], {}, "model.n_heads"),
    ],
    ids=[
        "unknown-key", "unknown-section", "wrong-type", "out-of-range", "heads", "seq-len",
        "toml-bad-key", "toml-malformed", "missing-file", "train-unknown-key", "train-heads",
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2_with_one_line(tmp_path, verb, args, files, must_name):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if files:
        config = str(tmp_path / "bad.toml")
    elif args[:1] == ["MISSING"]:
        config, args = str(tmp_path / "missing.toml"), args[1:]
    else:
        config = str(DEMO)
    cmd = ["config", "show", config] if verb == "show" else ["train", config]
    # run from an empty directory: `train` must fail on the config before touching data or run dirs
    r = stratus(*cmd, *args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert must_name in lines[0], lines[0]
    assert lines[0].startswith("stratus: error: ")
    assert r.stdout == ""
    if verb == "train":
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # nothing created
