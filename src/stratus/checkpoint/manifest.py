"""A checkpoint's manifest.json: written last, it lists every file with its size and sha256.
A directory whose files do not match it is damaged; one without it is incomplete.

No rank reads the whole checkpoint: each rank checksums the files it wrote, and on load
each rank verifies its share, so rank 0's part stays the same as the job grows."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stratus.atomic import write_json_atomic
from stratus.data.manifest import sha256_file

FORMAT = "stratus-checkpoint/1"
NAME = "manifest.json"


# DCP names each rank's shards __RANK_N.distcp; stratus names each rank's RNG state file.
_WRITER = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng/rank-(\d+)\.pt)$")


def owner(rel_path: str, world_size: int) -> int:
    """The rank that checksums a file: the rank that wrote it (folded onto the world when
    the world has shrunk since); files that no rank owns (DCP's .metadata, trainer.json)
    are rank 0's, and small."""
    m = _WRITER.match(rel_path)
    return int(m.group(1) or m.group(2)) % world_size if m else 0


def share(ckpt: Path, rank: int, world_size: int) -> list[str]:
    """The files of a checkpoint directory that this rank checksums."""
    files = (str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != NAME)
    return sorted(f for f in files if owner(f, world_size) == rank)


def entries(
    ckpt: Path, files: list[str], progress: Callable[[], None] = lambda: None
) -> list[dict[str, Any]]:
    """fsync, size and sha256 of files that this rank wrote: every rank hashes its own
    shards, in parallel, while they are still in the page cache."""
    out = []
    for rel in files:
        p = ckpt / rel
        with open(p, "rb") as f:  # the data must be on disk before the manifest vouches for it
            os.fsync(f.fileno())
        out.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
        progress()
    return out


def write_manifest(ckpt: Path, meta: dict[str, Any], files: list[dict[str, Any]]) -> None:
    """The manifest from the entries every rank gathered for its own files."""
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
        "files": sorted(files, key=lambda e: e["path"]),
    }
    write_json_atomic(ckpt / NAME, manifest)


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((ckpt / NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def verify(
    ckpt: Path,
    checksums: bool = True,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[], None] = lambda: None,
    sizes: bool = True,
) -> str | None:
    """None when the checkpoint matches its manifest, else what is wrong with it. Every
    file's presence and size are checked (a stat each; sizes=False leaves that to another
    rank); the sha256 of this rank's share only (all of them with one rank), so ranks
    verify a checkpoint in parallel."""
    if not (ckpt / NAME).exists():
        return "incomplete: no manifest.json"
    m = read_manifest(ckpt)
    if m is None:
        return "manifest.json is unreadable"
    for f in m["files"] if sizes else ():
        p = ckpt / f["path"]
        if not p.is_file():
            return f"{f['path']} is missing"
        size = p.stat().st_size
        if size != f["bytes"]:
            return f"{f['path']} is {size} bytes, the manifest says {f['bytes']}"
    for f in m["files"] if checksums else ():
        if owner(f["path"], world_size) == rank:
            if sha256_file(ckpt / f["path"]) != f["sha256"]:
                return f"{f['path']} does not match its sha256"
            progress()
    return None
