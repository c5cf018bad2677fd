"""Checkpoint directories by step, for both tiers: RUN/checkpoints/step-00001000, and the same
names under checkpoint.local_dir. Torch-free, so that a supervisor can read progress without
importing torch."""

from __future__ import annotations

import re
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-… directory, newest first (not verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)
