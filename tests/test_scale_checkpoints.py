"""Checkpoints at scale: each rank checksums what it wrote and verifies its share on load,
so rank 0 never reads the whole checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT, torchrun_script


def test_each_rank_checksums_its_own_files_and_a_damaged_shard_is_caught_by_its_reader(tmp_path: Path):
    r = torchrun_script(ROOT / "tests" / "ckpt_peer.py", str(tmp_path / "checkpoints"))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = {rank: json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)}
    for rank, d in ranks.items():
        other = f"__{1 - rank}_"
        # the commit: a rank hashes its own shards and RNG state, never the other's
        assert d["written_by_rank"] and set(d["written_by_rank"]) <= set(d["hashed_on_commit"])
        assert not [
            f for f in d["hashed_on_commit"] if f.startswith(other) or f == f"rng/rank-{1 - rank:05d}.pt"
        ]
        # the damaged step-2 shard is caught by rank 1, which reads it; every rank falls back to step 1
        assert d["found"] == 1
    assert "__1_0.distcp" in ranks[1]["hashed_on_find"]
    assert not [f for f in ranks[0]["hashed_on_find"] if f.startswith("__1_")]
    assert "__1_0.distcp does not match its sha256" in r.stderr
