"""Atomic writes, the one way stratus writes a file or directory that someone may read or
that a crash may interrupt: build it under a temporary name beside the destination, then
rename it into place. A reader sees the old version or the whole new one, never a torn one;
a failure leaves nothing behind and the old version untouched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stratus.errors import StratusError


@contextlib.contextmanager
def atomic_file(path: Path, fsync: bool = True, mode: int | None = None) -> Iterator[Path]:
    """Yields a temporary path to write (by any means: a library's savefig, a copy); on
    success it replaces `path`. fsync=False for files rewritten often whose loss costs
    little (progress accounting)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, fsync: bool = True, mode: int | None = None) -> None:
    with atomic_file(path, fsync, mode) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: Any, fsync: bool = True) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n", fsync)


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise StratusError(f"{out} already exists: use --force to replace it, or another --out")


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yields the temporary directory to fill; on success it becomes `out`, replacing an old
    one by two renames (the old one is moved aside first, then deleted)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
