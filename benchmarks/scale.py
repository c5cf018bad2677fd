"""The costs that grow with a run, measured:

1. checkpoint commit (shards written -> checksummed -> manifest -> rename) against checkpoint
   size and ranks: the seconds, and the bytes rank 0 checksums (its share must stay flat as
   ranks grow: no rank reads the whole checkpoint);
2. start-up against corpus size: what `stratus train` does on its start path (a stat per
   shard, the background verifier started) beside what a whole-corpus hash pass would cost;
3. dry-run time per shipped config.

    python benchmarks/scale.py [--sizes-gb 0.1,0.5,1] [--ranks 1,2,4] [--corpus-gb 0.1,1]
                               [--dryrun full|quick|none] [--dir /tmp/stratus-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {  # config -> the world it is meant for
    "configs/demo.toml": ["--world-size", "1"],
    "configs/llama3-8b.toml": ["--world-size", "64"],
    "configs/llama3-70b.toml": ["--nodes", "64"],
    "configs/gpt3-175b.toml": ["--nodes", "128", "--gpu", "a100-80gb"],
    "configs/llama3-405b.toml": ["--nodes", "128"],
}


def checkpoint_worker(root: Path, gb: float) -> None:
    """Under torchrun: save one checkpoint of `gb` of fp32 parameters (plus AdamW state: x3)
    sharded over the ranks, and report rank 0's commit time and checksummed bytes."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from stratus.checkpoint import manifest as mf
    from stratus.checkpoint.manager import CheckpointManager
    from stratus.distributed import env as denv

    env = denv.setup("cpu", 600)
    n = int(gb * 2**30 / 4 / 3)  # parameters + exp_avg + exp_avg_sq
    side = int(n**0.5) // 64 * 64
    model = torch.nn.Linear(side, side, bias=False)
    if env.world_size > 1:
        fully_shard(model, mesh=init_device_mesh("cpu", (env.world_size,)))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, side)).sum().backward()
    opt.step()
    ckpt = CheckpointManager(root, env)
    pending = ckpt.start(1, model, opt, {"step": 1}, {})
    denv.barrier(env)
    started = time.perf_counter()
    path = ckpt.finish(pending)
    commit = time.perf_counter() - started
    if env.is_main:
        files = mf.read_manifest(path)["files"]
        mine = sum(f["bytes"] for f in files if mf.owner(f["path"], env.world_size) == 0)
        total = sum(f["bytes"] for f in files)
        print(
            json.dumps({"commit_s": round(commit, 3), "rank0_hashed_gb": mine / 1e9, "total_gb": total / 1e9})
        )
    denv.teardown()


def checkpoints(sizes: list[float], ranks: list[int], base: Path) -> list[dict]:
    rows = []
    for gb in sizes:
        for n in ranks:
            root = base / f"ckpt-{gb}-{n}"
            shutil.rmtree(root, ignore_errors=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            cmd += [__file__, "--worker", str(root), str(gb)]
            r = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            if r.returncode:
                sys.exit(r.stderr[-2000:])
            row = {"gb": gb, "ranks": n, **json.loads(r.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(
                f"checkpoint {row['total_gb']:.2f} GB on {n} rank(s): commit {row['commit_s']:.2f}s, "
                f"rank 0 checksums {row['rank0_hashed_gb']:.2f} GB"
            )
            shutil.rmtree(root, ignore_errors=True)
    return rows


def fake_corpus(out: Path, gb: float, shard_mb: int = 256) -> Path:
    """Token shards of random uint16 and a manifest, in prepare's format, without a tokenizer
    run (start-up only reads the manifest and the shards)."""
    from stratus.atomic import write_json_atomic
    from stratus.data.manifest import FORMAT, sha256_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards, left, i = [], int(gb * 1e9), 0
    while left > 0:
        size = min(left, shard_mb * 2**20) // 2 * 2
        name = f"train-{i:05d}.bin"
        rng.integers(0, 4096, size // 2, dtype=np.uint16).tofile(out / name)
        shards.append(
            {
                "file": name,
                "split": "train",
                "tokens": size // 2,
                "bytes": size,
                "sha256": sha256_file(out / name),
            }
        )
        left, i = left - size, i + 1
    tokens = sum(s["tokens"] for s in shards)
    write_json_atomic(
        out / "manifest.json",
        {
            "format": FORMAT,
            "dtype": "uint16",
            "tokenizer": {"vocab_size": 4096, "sha256": ""},
            "splits": {"train": {"tokens": tokens}, "val": {"tokens": 0}},
            "shards": shards,
        },
    )
    return out


def startup(corpora: list[float], base: Path) -> list[dict]:
    from stratus.data.loader import TokenSplit
    from stratus.data.manifest import check_shard, read_manifest
    from stratus.data.verify import ShardVerifier

    rows = []
    for gb in corpora:
        data = fake_corpus(base / f"corpus-{gb}", gb)
        shards = read_manifest(data)["shards"]
        os.sync()
        started = time.perf_counter()
        TokenSplit(data, "train", verify=False)  # what the start path reads: sizes
        verifier = ShardVerifier(data, shards, rank=0, world_size=1)
        start_s = time.perf_counter() - started
        verifier.wait()
        background_s = time.perf_counter() - started
        started = time.perf_counter()
        for shard in shards:  # the old start path: every shard hashed before the first step
            check_shard(data, shard, verify_checksum=True)
        full_s = time.perf_counter() - started
        rows.append(
            {
                "corpus_gb": gb,
                "start_s": round(start_s, 4),
                "background_s": round(background_s, 2),
                "whole_pass_s": round(full_s, 2),
            }
        )
        print(
            f"corpus {gb:g} GB: start-up {start_s * 1000:.1f} ms (checksums {background_s:.1f}s in the "
            f"background) vs a whole-corpus pass before the first step {full_s:.1f}s"
        )
        shutil.rmtree(data, ignore_errors=True)
    return rows


def dryruns(mode: str) -> list[dict]:
    rows = []
    for config, size in SHIPPED.items():
        quick = ["--model.n_layers=4"] if mode == "quick" else []
        cmd = [sys.executable, "-m", "stratus", "dryrun", config, *size, *quick, "--json"]
        started = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        report = json.loads(r.stdout) if r.stdout.strip() else {}
        rows.append(
            {
                "config": config,
                "size": " ".join(size),
                "seconds": round(seconds, 1),
                "verdict": report.get("verdict"),
            }
        )
        print(
            f"dryrun {config} {' '.join(size)}{' (4 layers)' if quick else ''}: {seconds:.0f}s, "
            f"{report.get('verdict')}"
        )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return checkpoint_worker(Path(sys.argv[2]), float(sys.argv[3]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", default="0.1,0.5,1")
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--corpus-gb", default="0.1,1")
    p.add_argument("--dryrun", choices=["full", "quick", "none"], default="quick")
    p.add_argument("--dir", default="/tmp/stratus-scale")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    base = Path(a.dir)
    base.mkdir(parents=True, exist_ok=True)
    out = {
        "checkpoints": checkpoints(
            [float(x) for x in a.sizes_gb.split(",")], [int(x) for x in a.ranks.split(",")], base
        ),
        "startup": startup([float(x) for x in a.corpus_gb.split(",")], base),
        "dryrun": dryruns(a.dryrun) if a.dryrun != "none" else [],
    }
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
