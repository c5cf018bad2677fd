"""`stratus chat` (the REPL, driven by scripted input) and `stratus serve` as a real
process: its banner, a request over HTTP, a clean exit (130) on Ctrl-C, a one-line error for a
bad path."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stratus.data.chat_template import find_template
from stratus.data.tokenizer import load_tokenizer
from stratus.inference.engine import Engine, EngineConfig
from stratus.inference.request import RequestParams
from stratus.serve.repl import ChatSession, run_repl
from tests.conftest import ROOT
from tests.serving import make_export, tiny_model


@pytest.fixture
def session(tiny_data: Path):
    engine = Engine(tiny_model(), load_tokenizer(tiny_data / "tokenizer.json"), EngineConfig(max_batch=2))
    engine.start()
    yield ChatSession(engine, find_template(), RequestParams(max_tokens=12, temperature=0))
    engine.stop()


def test_repl_streams_replies_and_obeys_commands(session):
    lines = iter(
        ["hello", "/set temperature 0.5", "/set top_k many", "/system be terse", "/settings", "again"]
    )
    out = io.StringIO()

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    run_repl(session, read, out)
    text = out.getvalue()
    assert text.count("model> ") == 2
    assert "(temperature = 0.5)" in text and "top_k needs a int" in text and "temperature=0.5" in text
    assert session.system == "be terse"
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant"]  # /system reset it
    assert session.command("/reset") == "(conversation reset)" and session.turns == []
    assert session.command("/quit") is None


def test_long_conversations_drop_the_oldest_turns(session):
    for _ in range(12):
        session.reply("alpha beta gamma delta " * 3, lambda piece: None)
    ids = session.prompt_ids(12)
    assert len(ids) + 12 <= session.engine.context and len(session.turns) < 24


def test_serve_process_answers_and_exits_cleanly(tiny_data, tmp_path):
    export = make_export(tmp_path / "m", tiny_data / "tokenizer.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "stratus.serve",
        "serve",
        str(export),
        "--port",
        "0",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", banner)
        assert port, banner + proc.stderr.read()
        url = f"http://127.0.0.1:{port.group(1)}"
        deadline = time.monotonic() + 120  # the banner comes just before uvicorn starts accepting
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)  # refused at once until it listens: poll, do not spin
        r = httpx.post(
            url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        proc.send_signal(signal.SIGINT)  # a graceful shutdown, then the shell's code for Ctrl-C
        assert proc.wait(90) == 130 and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    bad = subprocess.run(
        [sys.executable, "-m", "stratus.serve", "serve", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("stratus: error:") and "Traceback" not in bad.stderr
