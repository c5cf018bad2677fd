"""A directory that appears whole or not at all: built under a temporary name beside its
destination, then renamed into place (replacing an old one only when asked)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from stratus.errors import StratusError


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise StratusError(f"{out} already exists: use --force to replace it, or another --out")


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yields the temporary directory to fill; on success it becomes `out`. On any failure
    nothing is left behind and an existing `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
