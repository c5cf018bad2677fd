"""Tensor-parallel serving on two real gloo ranks under torchrun: `stratus serve --tp 2`
shards the model with the TP plan (no sequence parallelism), rank 0 serves HTTP and sends
each step to rank 1, and the greedy outputs of a mixed batch, streamed and not, equal one
rank's; --tp without the processes for it is one error line and exit 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, run_cli
from tests.serving import LiveServer, make_export

PROMPTS = [[0, 5 + i, 17, 33, 9 * i + 1] * (i + 1) for i in range(6)]


@pytest.fixture(scope="module")
def export(tiny_data: Path, tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("tp") / "tiny", tiny_data / "tokenizer.json")


def _greedy(url: str, model: str) -> list[str]:
    """Six prompts of different lengths at once (one mixed batch of prefills and decodes),
    then one streamed."""

    def one(prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(one, PROMPTS))
    body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "stream": True}
    pieces = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return texts + ["".join(pieces)]


def test_tp2_serves_the_same_greedy_text_as_one_rank(export):
    one = LiveServer(export)
    try:
        want = _greedy(one.url, one.model)
    finally:
        assert one.stop() == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "stratus", "serve", str(export), "--tp", "2", "--port", "0", "--device", "cpu"]
    cmd += ["--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    found = threading.Event()

    def read():  # the banner gives the port; the rest is kept for the failure message
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"http://127\.0\.0\.1:\d+", line):
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(180), "".join(lines)[-3000:]
        url = re.search(r"(http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        # each rank holds half the model's 2 key/value heads, and so half the KV pool
        assert "tensor parallel over 2 ranks, 1 KV heads a rank" in "".join(lines)
        assert _greedy(url, model) == want
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def test_tp_without_its_processes_is_exit_2(export):
    r = run_cli("serve", str(export), "--tp", "2", "--port", "0", "--device", "cpu")
    assert r.returncode == 2 and "needs 2 processes" in r.stderr, r.stderr
