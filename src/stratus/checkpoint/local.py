"""The node-local checkpoint tier (Gemini's in-memory checkpoints, Megatron's local
checkpoints): frequent, cheap saves that a failure of a process or of one node does not lose.

Each rank writes its own state (its shards of the model and optimizer as they are, its RNG,
the trainer's position) to one file in checkpoint.local_dir, a directory on its own node
(local disk or /dev/shm), and sends the same bytes to one rank on the next node, which keeps
them in its own local_dir. Losing one node then loses no step: its ranks' files are on the
next node. Layout: LOCAL/step-00000100/rank-00003.pt with rank-00003.json beside it (size,
sha256, world size, layout, model), written after the .pt, each atomically.

A step is usable when every rank's file is found, verified, on some node (the rank's own, or
the copy its peer holds). Recovery takes the newest such step, sends each rank the file it
lacks from the node that has it, and each rank loads its own. The files hold shards as they
are, so they are usable only by a job of the same world size and layout; after the world
shrinks, the global DCP tier (which reshards) is the one to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from stratus.atomic import atomic_file, write_json_atomic
from stratus.checkpoint.manager import FLAT, CheckpointManager, Loaded
from stratus.checkpoint.rng import get_rng_state, set_rng_state
from stratus.checkpoint.steps import list_checkpoints, step_name
from stratus.data.manifest import sha256_file
from stratus.distributed.env import DistEnv, all_ranks_true

log = logging.getLogger("stratus.checkpoint")


def rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank-{rank:05d}.pt"


class LocalTier:
    def __init__(self, root: Path, env: DistEnv, layout: str, model_meta: dict[str, Any], keep: int = 2):
        self.root, self.env, self.keep = Path(root), env, keep
        self.identity = {"world_size": env.world_size, "layout": layout, "model": model_meta}
        # ranks are numbered node by node (torchrun), so rank + ranks-per-node is on the next node
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        spread = env.world_size > per_node  # on one node a copy would share the node's fate
        self.peer = (env.rank + per_node) % env.world_size if spread else None
        self.source = (env.rank - per_node) % env.world_size if spread else None  # whose copy I keep
        # the files travel on a CPU group: under NCCL the default group takes device tensors only
        self.group = None
        if env.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        self.root.mkdir(parents=True, exist_ok=True)

    def holds(self, path: Path) -> bool:
        return Path(path).parent == self.root

    # --- save ----------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, trainer: dict[str, Any]) -> Path:
        """Collective: this rank's file on its node and on its peer's. Raises OSError on every
        rank if any rank failed (the older local steps stay)."""
        step_dir = self.root / step_name(step)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT)
        state = {
            "model": _local(model_sd),
            "optim": _local(optim_sd),
            "rng": get_rng_state(),
            "trainer": trainer,
        }
        error: OSError | None = None
        try:
            self._store(step_dir, self.env.rank, step, lambda tmp: torch.save(state, tmp))
        except OSError as e:
            error = e
        mine = (
            _mapped(rank_file(step_dir, self.env.rank))
            if error is None
            else torch.empty(0, dtype=torch.uint8)
        )
        received = self._exchange(mine)  # every rank takes part, even one whose write failed
        if received is not None and received.numel() and error is None:
            try:
                self._store(step_dir, self.source, step, lambda tmp: received.numpy().tofile(tmp))
            except OSError as e:
                error = e
        if not all_ranks_true(self.env, error is None):
            raise OSError(f"local checkpoint of step {step} failed: {error or 'on another rank'}")
        self._retain(step)
        return step_dir

    def _store(self, step_dir: Path, rank: int, step: int, write: Callable[[Path], None]) -> None:
        """Write rank's file with `write`, atomically, then its sidecar. No fsync: a process
        that dies leaves the page cache to the kernel, a torn file after a power loss fails
        its sha256, and the copy on the peer node covers the node's loss."""
        step_dir.mkdir(parents=True, exist_ok=True)
        path = rank_file(step_dir, rank)
        with atomic_file(path, fsync=False) as tmp:
            write(tmp)
            size, digest = tmp.stat().st_size, sha256_file(tmp)
        meta = {
            "step": step,
            "rank": rank,
            "held_by": self.env.rank,  # a rank's own file, or the copy its peer keeps
            "bytes": size,
            "sha256": digest,
        }
        write_json_atomic(path.with_suffix(".json"), {**meta, **self.identity}, fsync=False)

    def _exchange(self, mine: torch.Tensor) -> torch.Tensor | None:
        """Send this rank's file to its peer on the next node; return the file of the rank
        whose peer this rank is (None on one node; empty if that rank had nothing to send)."""
        if self.peer is None:
            return None
        size = torch.tensor([mine.numel()], dtype=torch.int64)
        incoming = torch.zeros(1, dtype=torch.int64)
        _sendrecv(size, self.peer, incoming, self.source, self.group)
        inbox = torch.empty(int(incoming.item()), dtype=torch.uint8)
        _sendrecv(mine, self.peer, inbox, self.source, self.group)
        return inbox

    def _retain(self, newest: int) -> None:
        """Once every rank holds step `newest`, keep it and the `keep`-1 before it."""
        for step, path in list_checkpoints(self.root)[self.keep :]:
            if step < newest:
                shutil.rmtree(path, ignore_errors=True)

    def forget_after(self, step: int) -> None:
        """Drop this node's local steps after `step`: the run went back to `step` (a resume
        from the global tier, a rollback), so they belong to a future it left. Kept, a crash
        in the middle of their re-save could mix them with new files into a false step."""
        for newer, path in list_checkpoints(self.root):
            if newer > step:
                shutil.rmtree(path, ignore_errors=True)

    # --- recovery --------------------------------------------------------------------------

    def find(self, after: int = 0) -> tuple[int, Path] | None:
        """Collective: the newest step after `after` whose every rank's file is on some node,
        verified and of this job's world and layout; each rank then holds its own file of it
        (fetched from the node that has it). None when no such step is complete."""
        mine = self._inventory(after)
        everyone: list = [None] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(everyone, mine, group=self.group)
        else:
            everyone = [mine]
        steps = sorted({s for inv in everyone for s in inv}, reverse=True)
        for step in steps:
            holder = {}
            for h, inv in enumerate(everyone):
                for q in inv.get(step, ()):
                    if q == h or q not in holder:  # a rank's own file first: nothing to send
                        holder[q] = h
            if len(holder) < self.env.world_size:
                continue
            if all_ranks_true(self.env, self._fetch(step, holder)):
                moved = sum(1 for q, h in holder.items() if q != h)
                if self.env.is_main:
                    log.info(
                        "local checkpoint tier: step %d is complete on the nodes%s",
                        step,
                        f" (the files of {moved} rank(s) fetched from a peer node)" if moved else "",
                    )
                return step, self.root / step_name(step)
        return None

    def _inventory(self, after: int) -> dict[int, list[int]]:
        """{step: ranks} of the verified files in this node's directory that fit this job, of
        the steps after `after` (older ones cannot be the newest: they are not read)."""
        out: dict[int, list[int]] = {}
        for step, step_dir in list_checkpoints(self.root)[: self.keep + 1]:
            if step <= after:
                break
            for meta_path in sorted(step_dir.glob("rank-*.json")):
                rank, problem = self._verify(meta_path)
                if problem is None:
                    out.setdefault(step, []).append(rank)
                else:
                    log.warning("local checkpoint %s is unusable: %s", meta_path.with_suffix(".pt"), problem)
        return out

    def _verify(self, meta_path: Path) -> tuple[int, str | None]:
        """The rank a file holds, and what is wrong with it (None: whole, and of this job)."""
        blob = meta_path.with_suffix(".pt")
        try:
            meta = json.loads(meta_path.read_text())
            for key, value in self.identity.items():
                if meta.get(key) != value:
                    return -1, f"saved with {key} {meta.get(key)!r}, this job has {value!r}"
            if blob.stat().st_size != meta["bytes"]:
                return -1, f"{blob.stat().st_size} bytes, its sidecar says {meta['bytes']}"
            if sha256_file(blob) != meta["sha256"]:
                return -1, "does not match its sha256"
            return int(meta["rank"]), None
        except (OSError, ValueError, KeyError) as e:
            return -1, f"cannot be read ({e})"

    def _fetch(self, step: int, holder: dict[int, int]) -> bool:
        """Each rank whose own file is elsewhere receives it from its holder, in rank order
        (every rank walks the same list, so each send meets its receive)."""
        step_dir, rank, ok = self.root / step_name(step), self.env.rank, True
        for q, h in sorted(holder.items()):
            if q == h:
                continue
            if rank == h:
                blob = _mapped(rank_file(step_dir, q))
                dist.send(torch.tensor([blob.numel()], dtype=torch.int64), q, group=self.group)
                dist.send(blob, q, group=self.group)
            elif rank == q:
                size = torch.zeros(1, dtype=torch.int64)
                dist.recv(size, h, group=self.group)
                inbox = torch.empty(int(size.item()), dtype=torch.uint8)
                dist.recv(inbox, h, group=self.group)
                try:
                    self._store(step_dir, q, step, lambda tmp, inbox=inbox: inbox.numpy().tofile(tmp))
                except OSError as e:
                    log.warning("could not store the local checkpoint fetched for rank %d: %s", q, e)
                    ok = False
        return ok

    def load(self, path: Path, model, optimizer) -> Loaded:
        """Restore this rank's model and optimizer shards, and its RNG, from its own file."""
        state = torch.load(rank_file(path, self.env.rank), weights_only=False, mmap=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT)
        _restore(model_sd, state["model"])
        _restore(optim_sd, state["optim"])
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=FLAT)
        set_rng_state(state["rng"])
        return Loaded(step=int(state["trainer"]["step"]), path=path, trainer=state["trainer"])


def newest_of_tiers(ckpt: CheckpointManager, local: LocalTier | None) -> tuple[int, Path] | None:
    """Collective: the newer of the newest global checkpoint and the newest complete local
    step (the global one on a tie); local files no newer than the global step are not read."""
    found = ckpt.find()
    local_found = local.find(after=found[0] if found else 0) if local is not None else None
    return local_found if local_found is not None else found


def _local(sd: dict[str, Any]) -> dict[str, Any]:
    """A state dict with each DTensor replaced by this rank's shard of it, on the CPU. Saved
    at once, so the live CPU tensors need no copy; one that views a larger storage (a shard of
    a padded buffer) is copied, since torch.save writes a tensor's whole storage."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = (v.to_local() if isinstance(v, DTensor) else v).detach().cpu()
            if v.untyped_storage().nbytes() != v.numel() * v.element_size():
                v = v.clone()
        out[k] = v
    return out


def _restore(sd: dict[str, Any], saved: dict[str, Any]) -> None:
    """Copy saved shards into the live state dict, in place; refuse keys that differ."""
    if sd.keys() != saved.keys():
        missing, extra = sorted(sd.keys() - saved.keys()), sorted(saved.keys() - sd.keys())
        raise ValueError(f"the local checkpoint's keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            (v.to_local() if isinstance(v, DTensor) else v).copy_(saved[k])
        else:
            sd[k] = saved[k]


def _mapped(path: Path) -> torch.Tensor:
    """A file's bytes as a tensor that gloo can send, mapped copy-on-write (no read into memory)."""
    if path.stat().st_size == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))


def _sendrecv(out: torch.Tensor, dst: int, inbox: torch.Tensor, src: int, group) -> None:
    """Send to dst while receiving from src: every rank does both, so none waits on a send."""
    request = dist.isend(out, dst, group=group)
    dist.recv(inbox, src, group=group)
    request.wait()
