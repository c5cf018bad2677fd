"""Per-rank checkpoint checksums on real ranks: run under torchrun (gloo, 2 ranks). Saves two
checkpoints of an FSDP-sharded layer, records which files each rank's hasher read while
committing, damages one of rank 1's shards of the newest, and records which checkpoint
every rank then finds and who read the damaged file. Writes rank-R.json beside the checkpoints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from stratus.checkpoint import manifest
from stratus.checkpoint.manager import CheckpointManager
from stratus.distributed import env as denv

hashed: list[str] = []
_sha256 = manifest.sha256_file


def recording_sha256(path: Path, *args) -> str:
    hashed.append(str(path.relative_to(path.parents[1] if path.parent.name == "rng" else path.parent)))
    return _sha256(path, *args)


if __name__ == "__main__":
    root = Path(sys.argv[1])
    manifest.sha256_file = recording_sha256  # the hasher every checksum goes through
    env = denv.setup("cpu", 60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    fully_shard(model, mesh=init_device_mesh("cpu", (env.world_size,)))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    ckpt = CheckpointManager(root, env)
    ckpt.save(1, model, opt, {"step": 1}, {})
    hashed.clear()
    newest = ckpt.save(2, model, opt, {"step": 2}, {})
    on_commit = sorted(hashed)
    denv.barrier(env)
    if env.rank == 1:
        shard = newest / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    denv.barrier(env)
    hashed.clear()
    found = ckpt.find()
    (root.parent / f"rank-{env.rank}.json").write_text(
        json.dumps(
            {
                "rank": env.rank,
                "hashed_on_commit": on_commit,
                "hashed_on_find": sorted(hashed),
                "found": found[0] if found else None,
                "written_by_rank": sorted(p.name for p in newest.glob(f"__{env.rank}_*.distcp")),
            }
        )
    )
    os.environ.pop("RANK", None)
    denv.teardown()
