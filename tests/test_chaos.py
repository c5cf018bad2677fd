"""`stratus chaos`: a real run with about ten random faults ends bit for bit where a
fault-free run ends, with nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

from stratus.reliability.chaos import SAVE_FAULTS, plan_faults
from tests.browser import chromium  # noqa: F401  (a fixture)
from tests.conftest import run_cli

CONFIG = """
[model]
n_layers = 2
d_model = 32
n_heads = 4
max_seq_len = 64
[data]
path = "{data}"
seq_len = 32
[train]
steps = 40
micro_batch = 8
lr = 3e-3
warmup_steps = 2
[checkpoint]
interval = 4
keep = 3
[eval]
interval = 0
[log]
interval = 1
tensorboard = false
"""


def test_fault_plan_is_seeded_and_save_faults_hit_checkpoints():
    plan = plan_faults(40, 4, 10, seed=3)
    assert plan == plan_faults(40, 4, 10, seed=3) != plan_faults(40, 4, 10, seed=4)
    assert len({s for _, s in plan}) == 10
    assert all(s % 4 == 0 for k, s in plan if k in SAVE_FAULTS)


def test_chaos_campaign_loses_nothing(tiny_data: Path, tmp_path: Path, chromium):  # noqa: F811
    config = tmp_path / "chaos.toml"
    config.write_text(CONFIG.format(data=tiny_data))
    r = run_cli(
        "chaos",
        str(config),
        "--faults",
        "10",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "c"),
        "--hang-timeout",
        "4",
        "--report",
        str(tmp_path / "chaos.html"),
        "--json",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["bitwise_equal"] is True and report["steps_lost"] == 0
    assert sum(v["injected"] for v in report["by_kind"].values()) == 10
    assert all(v["recovered"] == v["injected"] for v in report["by_kind"].values())
    assert report["restarts"] >= 1 and report["recover_s"]["max"] is not None

    # the campaign's report: every fault that fired is a row with its recovery, on the
    # timeline of the chaos run, beside the fault-free run's curves
    assert report["report"]["html"] == str(tmp_path / "chaos.html") and (tmp_path / "chaos.png").is_file()
    dom = chromium.dom(tmp_path / "chaos.html")
    assert "<h2>Faults and recovery</h2>" in dom and "<h2>Timeline</h2>" in dom
    table = dom[dom.index('id="fault-table"') :]
    table = table[: table.index("</table>")]
    fired = list((tmp_path / "c" / "chaos" / "faults").iterdir())
    assert table.count("<tr>") == 1 + len(fired)  # a header and a row per fault that fired
    ends_process = sum(1 for f in fired if f.name.split("-")[0] in ("kill", "hang", "crash_during_save"))
    assert table.count("killed by") + table.count("hang (watchdog)") == ends_process > 0
    assert "<td>chaos</td>" in dom and "<td>fault-free</td>" in dom
