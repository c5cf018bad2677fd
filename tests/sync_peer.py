"""Runs `stratus train ARGS…` (one process, or a rank under torchrun) and records every read
of a tensor's value by the host: `.item()`, `bool()`, `float()` and the rest reach aten's
_local_scalar_dense (seen by a dispatch mode); `.tolist()` and `.numpy()` do not, so they
are wrapped. Each read is filed as inside a training step (Trainer.train_step: the forward,
backward, clip, update) or outside it, and the steps at which the loop read its numbers
are listed. Writes OUT/rank-R.json.

Usage: python tests/sync_peer.py OUT train ARGS…"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stratus.cli import main
from stratus.train.loop import Trainer

where = {"in_step": False}
found: dict[str, list] = {"in_step": [], "outside": [], "read_at": []}


def note(what: str) -> None:
    if where["in_step"]:
        stack = traceback.extract_stack()[-8:-2]
        found["in_step"].append({"read": what, "stack": [f"{f.filename}:{f.lineno}" for f in stack]})
    else:
        found["outside"].append(what)


class HostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            note("item")
        return func(*args, **(kwargs or {}))


def wrap(name: str) -> None:
    original = getattr(torch.Tensor, name)

    def reading(self, *args, **kwargs):
        note(name)
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, reading)


def wrap_trainer() -> None:
    step, read = Trainer.train_step, Trainer.read_steps

    def train_step(self):
        where["in_step"] = True
        try:
            return step(self)
        finally:
            where["in_step"] = False

    def read_steps(self, logged):
        found["read_at"].append(self.step)
        return read(self, logged)

    Trainer.train_step, Trainer.read_steps = train_step, read_steps


if __name__ == "__main__":
    out = Path(sys.argv[1])
    wrap("tolist")
    wrap("numpy")
    wrap_trainer()
    try:
        with HostReads():
            code = main(sys.argv[2:])
    finally:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(found))
    sys.exit(code)
