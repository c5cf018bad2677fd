"""The prepared data's manifest.json: read, check against the files, hash helpers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stratus.errors import StratusError

FORMAT = "stratus-data/1"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    d = Path(data_dir)
    path = d / "manifest.json"
    if not path.is_file():
        raise StratusError(
            f"{d} is not prepared data (no manifest.json): run `stratus prepare --out {d}` first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StratusError(f"{path} is corrupt ({e}): prepare the data again") from None
    if manifest.get("format") != FORMAT:
        raise StratusError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_shard(data_dir: Path, shard: dict[str, Any], verify_checksum: bool) -> None:
    """Refuse a shard whose size (always) or sha256 (when asked) differs from the manifest."""
    path = data_dir / shard["file"]
    if not path.is_file():
        raise StratusError(f"shard {path} named in the manifest is missing: prepare the data again")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise StratusError(
            f"shard {path} is {size} bytes, the manifest says {shard['bytes']}: "
            "it is damaged; prepare the data again"
        )
    if verify_checksum and sha256_file(path) != shard["sha256"]:
        raise StratusError(
            f"shard {path} does not match its sha256 in the manifest: it is damaged; prepare the data again"
        )
