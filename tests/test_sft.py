"""From a base model to a chat model: chat data, loss masking, packing, SFT, DPO, and the
one chat contract from training to serving (transformers' apply_chat_template, the export,
the served end of turn)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from stratus.data.chat_template import CHAT, IM_END, add_chat_tokens
from stratus.data.packing import IGNORE, ChatSampler
from stratus.data.prepare_chat import prepare_chat
from stratus.errors import StratusError
from stratus.train.evaluate import evaluate_trained
from stratus.train.loop import train
from tests.conftest import ROOT, TINY_ARGS, WORDS, metrics, run_cli, torchrun_script

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Sum 2+2"},
    {"role": "assistant", "content": "4"},
]


def chat_lines(n: int) -> list[str]:
    """Learnable conversations: the word after a word in WORDS."""
    out = []
    for i in range(n):
        convo = [
            {"role": "user", "content": f"next {WORDS[i % 8]}"},
            {"role": "assistant", "content": WORDS[(i + 1) % 8]},
        ]
        if i % 3 == 0:
            convo = [{"role": "system", "content": "answer"}, *convo]
        out.append(json.dumps({"messages": convo}))
    return out


def pair_lines(n: int) -> list[str]:
    return [
        json.dumps({"prompt": f"next {w}", "chosen": WORDS[(i + 1) % 8], "rejected": WORDS[(i + 5) % 8]})
        for i, w in ((i, WORDS[i % 8]) for i in range(n))
    ]


@pytest.fixture(scope="module")
def base_run(tiny_data: Path, tmp_path_factory) -> Path:
    """A pretrained tiny model (the base for fine-tuning)."""
    from stratus.config import load_config
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("base") / "run"
    cfg = load_config(None, {**TINY, "data.path": str(tiny_data), "run.dir": str(run), "train.steps": 12})
    train(cfg)
    return run


@pytest.fixture(scope="module")
def chat_data(base_run: Path, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("chat")
    (base / "train.jsonl").write_text("\n".join(chat_lines(240)) + "\n")
    tok = str(base_run / "tokenizer.json")
    prepare_chat([str(base / "train.jsonl")], base / "data", tok, say=lambda s: None)
    return base / "data"


def sft_args(data: Path, run: Path, init: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"--data.path={data}",
        "--data.format=chat",
        f"--run.dir={run}",
        f"--train.init_from={init}",
        *TINY_ARGS,
        "--data.seq_len=64",  # a conversation of the tiny tokenizer is about 45 tokens
        "--train.steps=8",
        "--train.micro_batch=4",
        "--checkpoint.interval=2",
        *extra,
    ]


def stratus(*args: str, faults: str = "", nproc: int = 1):
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRATUS_FAULTS": faults}
    if nproc > 1:
        return torchrun_script("-m", "stratus", *args, nproc=nproc, env=env)
    cmd = [sys.executable, "-m", "stratus", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def curve(run: Path) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r.get("grad_norm")) for r in metrics(run) if "grad_norm" in r}


# --- the template and the mask -------------------------------------------------------------


def test_loss_mask_covers_the_assistant_replies_and_their_end_of_turn(tiny_data: Path):
    tok = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    add_chat_tokens(tok)
    ids, mask = CHAT.encode(tok, TWO_TURNS)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert trained == f"Hello!{IM_END}4{IM_END}"
    # everything else (system, user, the turn headers, BOS) is context only
    rest = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=False)
    assert "Be brief." in rest and "Sum 2+2" in rest and "Hello" not in rest
    assert ids[0] == tok.token_to_id("<|endoftext|>") and not mask[0]


def test_template_round_trip_against_transformers_token_for_token(base_run: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    convos = [TWO_TURNS] + [json.loads(line)["messages"] for line in chat_lines(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in convos))
    out = tmp_path / "data"
    tok = str(base_run / "tokenizer.json")
    prepare_chat([str(tmp_path / "c.jsonl")], out, tok, val_fraction=0, say=lambda s: None)
    theirs = AutoTokenizer.from_pretrained(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert theirs.eos_token == IM_END and theirs.eos_token_id == manifest["tokenizer"]["end_of_turn_id"]
    stream = np.fromfile(out / "train-00000.bin", dtype=manifest["dtype"])
    starts = np.append(np.fromfile(out / "train-docs.bin", dtype=np.int64), len(stream))
    for k, convo in enumerate(convos):
        rendered = theirs.apply_chat_template(convo, tokenize=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert list(rendered) == stream[starts[k] : starts[k + 1]].tolist()
    # a generation prompt ends where the model's reply begins
    prompt = theirs.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and prompt == CHAT.render(TWO_TURNS[:2])


def test_malformed_lines_are_named_by_line_and_nothing_is_written(base_run: Path, tmp_path: Path):
    good = chat_lines(3)
    (tmp_path / "bad.jsonl").write_text(
        "\n".join([good[0], '{"messages": [{"role": "robot", "content": "x"}]}', "{not json", good[1]])
    )
    out = tmp_path / "out"
    tok = str(base_run / "tokenizer.json")
    bad = str(tmp_path / "bad.jsonl")
    r = run_cli("prepare", "--format", "chat", "--tokenizer", tok, bad, "--out", str(out))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2:" in err[0] and "'robot'" in err[0] and "--skip-bad" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".tmp*"))
    for line, problem in (("[]", "JSON object"), ('{"messages": []}', "empty"), ("{not", "not JSON")):
        (tmp_path / "one.jsonl").write_text(good[0] + "\n" + line + "\n")
        with pytest.raises(StratusError, match=f"one.jsonl:2: .*{problem}"):
            prepare_chat([str(tmp_path / "one.jsonl")], out, tok, say=lambda s: None)
    m = prepare_chat([str(tmp_path / "bad.jsonl")], out, tok, skip_bad=True, say=lambda s: None)
    assert m["records"]["read"] == 2 and m["records"]["skipped"] == 2
    assert [s["line"] for s in m["records"]["skipped_lines"]] == ["2", "3"]
    with pytest.raises(StratusError, match="--format preferences"):
        (tmp_path / "pairs.jsonl").write_text("\n".join(pair_lines(2)))
        prepare_chat([str(tmp_path / "pairs.jsonl")], tmp_path / "p", tok, say=lambda s: None)


# --- packing --------------------------------------------------------------------------------


def test_packed_rows_keep_attention_and_positions_inside_each_conversation(chat_data: Path):
    from stratus.config import ModelConfig
    from stratus.model import Transformer

    sampler = ChatSampler(chat_data, "train", 160, seed=0, shuffle=False)
    x, y, doc = sampler.batch(0, 2)
    assert int(doc[0].max()) >= 2  # several conversations share a row
    assert sampler.targets(0, 2) == int((y != IGNORE).sum())
    assert 0 < sampler.padding < 0.5
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=sampler.split.vocab_size, n_layers=2, d_model=32, n_heads=4))
    with torch.no_grad():
        packed = model(x, doc=doc)
        for row in range(2):
            for k in doc[row].unique().tolist():
                at = (doc[row] == k).nonzero().flatten()
                alone = model(x[row : row + 1, at])  # the conversation by itself, from position 0
                torch.testing.assert_close(packed[row, at], alone[0], rtol=1e-4, atol=1e-5)
        # without the document numbers, later conversations see the earlier ones
        assert not torch.allclose(model(x)[0], packed[0], atol=1e-3)


# --- fine-tuning ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(base_run: Path, chat_data: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sft") / "run"
    r = stratus(*sft_args(chat_data, run, base_run, "--train.steps=40", "--train.lr=1e-2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_sft_lowers_held_out_chat_loss_below_the_base_model(base_run: Path, chat_data: Path, sft_run: Path):
    base = evaluate_trained(str(base_run), str(chat_data), seq_len=64)
    tuned = evaluate_trained(str(sft_run), str(chat_data), seq_len=64)
    assert tuned["tokens"] == base["tokens"] > 0  # the same held-out assistant tokens
    assert tuned["val_loss"] < base["val_loss"] - 2  # nats per trained-on token
    log = (sft_run / "train.log").read_text()
    assert "initialized from" in log and "padding" in log
    # the vocabulary grew for the two chat tokens; the rest of the shape is the base's
    cfg = (sft_run / "config.toml").read_text()
    assert "vocab_size = 384" in cfg and "d_model = 32" in cfg


@pytest.mark.parametrize("layout", ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2"])
def test_sft_on_two_ranks_matches_one_process(layout, base_run: Path, chat_data: Path, tmp_path_factory):
    one = tmp_path_factory.getbasetemp() / "sft-one-process"
    if not (one / "metrics.jsonl").is_file():  # the same one-process run for both layouts
        r = stratus(*sft_args(chat_data, one, base_run))
        assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path_factory.mktemp("sft-two")
    r = stratus(*sft_args(chat_data, two, base_run, layout), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = curve(one), curve(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:  # the mean over trained-on tokens of the whole batch, however the ranks split it
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-4)
        assert b[step][1] == pytest.approx(a[step][1], rel=1e-3)


def test_killed_sft_run_resumes_exactly(base_run: Path, chat_data: Path, tmp_path: Path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = stratus(*sft_args(chat_data, whole, base_run))
    assert r.returncode == 0, r.stderr[-3000:]
    r = stratus(*sft_args(chat_data, killed, base_run), "--max-restarts=3", faults="kill@step=3,kill@step=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert curve(killed) == curve(whole)  # bit for bit: the weights restart from the checkpoint, not the base
    assert len((killed / "restarts.jsonl").read_text().splitlines()) == 2


def test_init_from_refuses_another_shape_and_foreign_tokenizers(base_run, chat_data, tiny_data, tmp_path):
    r = stratus(*sft_args(chat_data, tmp_path / "a", base_run, "--model.d_model=64"))
    assert r.returncode == 2 and "model.d_model = 64" in r.stderr and "drop model.d_model" in r.stderr
    r = stratus(*sft_args(tiny_data, tmp_path / "b", base_run))
    assert r.returncode == 2 and "set data.format = text" in r.stderr


# --- preference tuning ------------------------------------------------------------------------


def test_dpo_raises_the_chosen_minus_rejected_margin(sft_run: Path, tmp_path: Path):
    (tmp_path / "p.jsonl").write_text("\n".join(pair_lines(64)))
    data = tmp_path / "pairs"
    tok = str(sft_run / "tokenizer.json")
    m = prepare_chat([str(tmp_path / "p.jsonl")], data, tok, preferences=True, say=lambda s: None)
    assert m["kind"] == "preferences"
    run = tmp_path / "dpo"
    args = [
        "train",
        f"--data.path={data}",
        "--data.format=chat",
        f"--run.dir={run}",
        f"--train.init_from={sft_run}",
        "--train.objective=dpo",
        *TINY_ARGS,
        "--data.seq_len=64",
        "--train.lr=1e-2",
        "--train.warmup_steps=2",
        "--train.steps=24",
        "--train.micro_batch=4",
        "--checkpoint.interval=12",
    ]
    # the first half on 2 FSDP ranks (the reference is scored by the sharded model), the
    # second in one process, resharded from the checkpoint
    r = stratus(*args, "--train.stop_at=12", "--parallel.dp_shard=2", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = (run / "reference_logps.npy").read_bytes()
    r = stratus(*args)  # resumes: the reference is read back, not recomputed from moved weights
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "reference_logps.npy").read_bytes() == reference
    lines = [x for x in metrics(run) if "reward_margin" in x]
    assert [x["step"] for x in lines] == list(range(1, 25))
    first = lines[0]
    assert first["reward_margin"] == 0.0  # the policy starts as the reference
    assert first["loss"] == pytest.approx(np.log(2), rel=1e-4)
    # over every training pair (a step sees 8, too few to judge by): the tuned model prefers
    # the chosen answers by more than the reference did
    from stratus.checkpoint.load import load_trained
    from stratus.data.packing import PairSampler
    from stratus.train.dpo import answer_logps

    pairs = PairSampler(data, "train", 64, seed=0)
    x, y, _ = pairs.pairs(np.arange(pairs.n_windows))
    with torch.no_grad():
        logps = answer_logps(load_trained(run).model, x, y, contextlib.nullcontext()).double().view(-1, 2)
    ref = torch.from_numpy(np.load(run / "reference_logps.npy"))
    margin = 0.1 * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    assert margin.mean() > 0.1 and (margin > 0).double().mean() > 0.75

    # the run's report shows the preference metrics it wrote, the restart-free resume included
    from stratus.report.page import write_report

    page, _, (read,) = write_report([run], tmp_path / "report.html")
    text = page.read_text()
    assert "<h2>Chat metrics</h2>" in text and "reward margin" in text and "preference accuracy" in text
    assert len(read.events("start")) == 2 and read.series("reward_margin")[0] == list(range(1, 25))


# --- one contract from training to serving ---------------------------------------------------------


def test_export_carries_the_template_and_serving_stops_on_the_end_of_turn(sft_run: Path, tmp_path: Path):
    import openai
    from transformers import AutoTokenizer

    from stratus.checkpoint.hf_export import export_hf
    from tests.serving import LiveServer

    out = export_hf(sft_run, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(out)
    eot = theirs.convert_tokens_to_ids(IM_END)
    assert theirs.apply_chat_template(TWO_TURNS, tokenize=False) == CHAT.render(TWO_TURNS, False)
    generation = json.loads((out / "generation_config.json").read_text())
    assert eot in generation["eos_token_id"]
    # transformers' own generate, on the export's template, ends the turn on the same token
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    prompt = theirs.apply_chat_template(
        [{"role": "user", "content": "next gamma"}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.shape[1] :]
    assert generated[-1].item() == eot and len(generated) < 20

    server = LiveServer(out)
    try:
        assert server.state.template.end_of_turn == IM_END
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        # the end-of-turn token forced as the first reply token: the reply ends there, empty
        reply = client.chat.completions.create(
            model=server.model, messages=TWO_TURNS[:2], max_tokens=20, logit_bias={str(eot): 100}
        )
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == ""
        assert reply.usage.completion_tokens == 0
        # the fine-tuned model answers with a word, as it was taught, and ends its turn by itself
        ask = [{"role": "user", "content": "next alpha"}]
        reply = client.chat.completions.create(model=server.model, messages=ask, max_tokens=20, temperature=0)
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content in WORDS
    finally:
        server.stop()
