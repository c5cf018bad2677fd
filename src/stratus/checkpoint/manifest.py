"""A checkpoint's manifest.json: written last, it lists every file with its size and sha256.
A directory whose files do not match it is damaged; one without it is incomplete."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from stratus.data.manifest import sha256_file, write_json_atomic

FORMAT = "stratus-checkpoint/1"
NAME = "manifest.json"


def write_manifest(ckpt: Path, meta: dict[str, Any]) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != NAME)
    entries = []
    for p in files:
        with open(p, "rb") as f:  # the data must be on disk before the manifest vouches for it
            os.fsync(f.fileno())
        entries.append(
            {"path": str(p.relative_to(ckpt)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        )
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
        "files": entries,
    }
    write_json_atomic(ckpt / NAME, manifest)


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((ckpt / NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def verify(ckpt: Path, checksums: bool = True) -> str | None:
    """None when the checkpoint matches its manifest, else what is wrong with it."""
    if not (ckpt / NAME).exists():
        return "incomplete: no manifest.json"
    m = read_manifest(ckpt)
    if m is None:
        return "manifest.json is unreadable"
    for f in m["files"]:
        p = ckpt / f["path"]
        if not p.is_file():
            return f"{f['path']} is missing"
        size = p.stat().st_size
        if size != f["bytes"]:
            return f"{f['path']} is {size} bytes, the manifest says {f['bytes']}"
        if checksums and sha256_file(p) != f["sha256"]:
            return f"{f['path']} does not match its sha256"
    return None
