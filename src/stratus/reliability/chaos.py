"""`stratus chaos CONFIG --faults N --seed S`: rehearse a long run's bad days on a real job.

Two real runs of the same config: a reference, and a chaos run under the supervisor with N
random faults (kill, hang, crash_during_save, corrupt_checkpoint, nan) at random steps.
Faults that change the mathematics on purpose (nan skips an update) are injected into the
reference too, so in deterministic mode the two runs must end bit for bit equal: every
step's loss and gradient norm, and the final parameters. Spikes are left out of the random
mix because the checkpoint a rollback returns to depends on which ones other faults spared.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import torch

from stratus.checkpoint.load import load_trained
from stratus.config import load_config
from stratus.errors import StratusError

PROCESS_FAULTS = ("kill", "hang", "crash_during_save", "corrupt_checkpoint")
SAVE_FAULTS = ("crash_during_save", "corrupt_checkpoint")  # only meaningful at a checkpoint step
SEMANTIC_FAULTS = ("nan",)


def plan_faults(steps: int, interval: int, n: int, seed: int) -> list[tuple[str, int]]:
    """N distinct (kind, step) pairs; save faults land on checkpoint steps."""
    rng = random.Random(seed)
    save_steps = [s for s in range(interval, steps, interval)] if interval else []
    kinds = PROCESS_FAULTS + SEMANTIC_FAULTS
    chosen: set[tuple[str, int]] = set()
    for _ in range(50 * n):
        if len(chosen) == n:
            break
        kind = rng.choice(kinds if save_steps else tuple(k for k in kinds if k not in SAVE_FAULTS))
        step = rng.choice(save_steps) if kind in SAVE_FAULTS else rng.randint(2, steps - 1)
        if all(s != step for _, s in chosen):  # one fault per step keeps each one observable
            chosen.add((kind, step))
    if len(chosen) < n:
        raise StratusError(f"{n} faults do not fit in {steps} steps: lower --faults or raise train.steps")
    return sorted(chosen, key=lambda f: f[1])


def _curve(run: Path) -> dict[int, tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("grad_norm")) for r in rows if "grad_norm" in r}


def _recovery_seconds(run: Path) -> list[float]:
    """Failure (restarts.jsonl) to the next "resumed from" line of train.log."""
    failures = (
        [json.loads(x)["time"] for x in (run / "restarts.jsonl").read_text().splitlines()]
        if (run / "restarts.jsonl").exists()
        else []
    )
    resumes = []
    for line in (run / "train.log").read_text().splitlines():
        if "resumed from" in line and (m := re.match(r"(\S+ \S+),(\d+)", line)):
            resumes.append(
                datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3
            )
    return [min((r - f for r in resumes if r >= f), default=float("nan")) for f in failures]


def run_chaos(
    config: str, overrides: list[str], n_faults: int, seed: int, out: Path, hang_timeout_s: float = 10.0
) -> dict:
    overrides = [*overrides, "--train.deterministic=true"]  # the bitwise comparison needs it
    cfg = load_config(config, _as_dict(overrides))
    faults = plan_faults(cfg.train.steps, cfg.checkpoint.interval, n_faults, seed)
    spec = ",".join(f"{k}@step={s}" for k, s in faults)
    semantic = ",".join(f"{k}@step={s}" for k, s in faults if k in SEMANTIC_FAULTS)
    out.mkdir(parents=True, exist_ok=True)
    ref, chaos = out / "reference", out / "chaos"
    base = [
        sys.executable,
        "-m",
        "stratus",
        "train",
        config,
        *overrides,
        f"--reliability.hang_timeout_s={hang_timeout_s}",
    ]
    env = {**os.environ, "STRATUS_FAULTS": ""}
    started = time.time()
    r = subprocess.run(
        [*base, f"--run.dir={ref}", f"--reliability.faults={semantic}"],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise StratusError(f"the reference run failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    reference_s = time.time() - started
    started = time.time()
    r = subprocess.run(
        [*base, f"--run.dir={chaos}", f"--max-restarts={3 * n_faults}"],
        env={**env, "STRATUS_FAULTS": spec},
        capture_output=True,
        text=True,
    )
    chaos_s = time.time() - started
    a, b = _curve(ref), _curve(chaos)
    lost = sum(1 for step, v in a.items() if b.get(step) != v)
    equal = r.returncode == 0 and lost == 0 and _same_weights(ref, chaos)
    fired = (
        {p.name.rsplit("-", 1)[0] for p in (chaos / "faults").glob("*")}
        if (chaos / "faults").exists()
        else set()
    )
    by_kind = Counter(k for k, _ in faults)
    recovered = Counter(k for k, s in faults if f"{k}-step{s}-rank0" in fired and r.returncode == 0)
    rec = [x for x in _recovery_seconds(chaos) if x == x]
    goodput = json.loads((chaos / "goodput.json").read_text()) if (chaos / "goodput.json").exists() else {}
    wall = goodput.get("last_update", 0) - goodput.get("first_start", 0)
    return {
        "faults": [{"kind": k, "step": s} for k, s in faults],
        "by_kind": {k: {"injected": by_kind[k], "recovered": recovered[k]} for k in sorted(by_kind)},
        "chaos_exit_code": r.returncode,
        "steps_lost": lost,
        "bitwise_equal": equal,
        "ettr": round(goodput.get("productive_s", 0) / wall, 4) if wall > 0 else None,
        "restarts": goodput.get("restarts", 0),
        "recover_s": {
            "median": round(sorted(rec)[len(rec) // 2], 2) if rec else None,
            "max": round(max(rec), 2) if rec else None,
        },
        "reference_s": round(reference_s, 1),
        "chaos_s": round(chaos_s, 1),
        "runs": {"reference": str(ref), "chaos": str(chaos)},
    }


def _as_dict(overrides: list[str]) -> dict:
    from stratus.config import parse_overrides

    return parse_overrides(overrides)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_trained(a).model.state_dict(), load_trained(b).model.state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
