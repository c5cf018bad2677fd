"""Atomic, verified checkpoints in DCP format, with retention.

Layout: RUN/checkpoints/step-00001000/ holds the DCP shards (.distcp + .metadata), per-rank
RNG states (rng/rank-00000.pt), trainer.json (step, data position, scheduler) and
manifest.json. A save writes everything under .tmp-step-…, writes the manifest last, renames
the directory into place, then updates `latest`. A load takes the newest checkpoint that
matches its manifest; damaged ones are reported and skipped. Retention keeps the newest
`keep`, every `keep_every`-th, and never the newest verified one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from stratus.atomic import write_atomic, write_json_atomic
from stratus.checkpoint import manifest as mf
from stratus.checkpoint.rng import get_rng_state, set_rng_state
from stratus.checkpoint.steps import list_checkpoints, step_name
from stratus.distributed.env import DistEnv, all_ranks_true, barrier, broadcast_object, gather_object
from stratus.errors import StratusError

log = logging.getLogger("stratus.checkpoint")

# torch 2.11 closes a DefaultStager's copier at the end of its first save, so a second async
# save through the same stager fails (torch issue 183413, fixed for 2.13): there each save
# gets a stager of its own, and the reuse of staging memory is lost on those versions only.
STAGER_REUSABLE = not (2, 11) <= tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)


def newest_verified(root: Path, checksums: bool = True) -> tuple[int, Path] | None:
    """The newest checkpoint that matches its manifest; warns about each damaged one skipped."""
    for step, path in list_checkpoints(root):
        problem = mf.verify(path, checksums)
        if problem is None:
            return step, path
        log.warning("checkpoint %s is unusable (%s); trying the previous one", path, problem)
    return None


def _no_dist(env: DistEnv) -> bool:
    return not env.distributed


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns on every single-process save/load even when asked for one; that is our
    intended mode with a world of one, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass
class Loaded:
    step: int
    path: Path
    trainer: dict[str, Any]


class SaveError(Exception):
    """A checkpoint could not be written (full disk, I/O error); the previous ones are intact."""


@dataclass
class PendingSave:
    """A save whose shards may still be in flight (async); committed by finish()."""

    step: int
    tmp: Path
    trainer: dict[str, Any]
    meta: dict[str, Any]
    future: Any = None  # DCP's future for an async save

    def written(self) -> bool:
        return self.future is None or self.future.done()


class CheckpointManager:
    def __init__(self, root: Path, env: DistEnv, keep: int = 3, keep_every: int = 0, async_group=None):
        self.root, self.env, self.keep, self.keep_every = Path(root), env, keep, keep_every
        self.async_group = async_group  # a separate process group: async writes must not race training's
        self._stager = None  # kept across saves, so its CPU staging buffers are allocated once
        # Called at each unit of progress in a save or a verification (a file checksummed):
        # the trainer beats its watchdog here, so a long save that progresses is not a hang.
        self.progress: Callable[[], None] = lambda: None

    # --- save ----------------------------------------------------------------------------

    def save(self, step, model, optimizer, trainer, meta, before_commit=None) -> Path:
        """Collective and synchronous. Raises SaveError, on every rank, if any rank failed."""
        return self.finish(self.start(step, model, optimizer, trainer, meta), before_commit)

    def start(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer: dict[str, Any],
        meta: dict[str, Any],
        asynchronous: bool = False,
    ) -> PendingSave:
        """Collective. Stage the state and write it under .tmp-step-…; with asynchronous, the
        write goes on in the background and the loop continues once the state is staged."""
        env = self.env
        pending = PendingSave(step, self.root / f".tmp-{step_name(step)}", trainer, meta)
        error = None
        try:
            if env.is_main:
                shutil.rmtree(pending.tmp, ignore_errors=True)
                (pending.tmp / "rng").mkdir(parents=True)
            barrier(env)
            model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT)
            state = {"model": model_sd, "optim": optim_sd}
            # serialized in memory, then written: a full disk is then an OSError (ENOSPC) that
            # says so, not torch's zip writer's "unexpected pos" from inside torch.save
            rng = io.BytesIO()
            torch.save(get_rng_state(), rng)
            (pending.tmp / "rng" / f"rank-{env.rank:05d}.pt").write_bytes(rng.getvalue())
            with _one_process_ok():
                if asynchronous:
                    if self._stager is None or not STAGER_REUSABLE:
                        cuda = env.device.type == "cuda"
                        # staging finishes before the loop goes on (the optimizer must not change
                        # what is being copied); the write itself runs in the background
                        options = StagingOptions(
                            use_pinned_memory=cuda,
                            use_shared_memory=False,
                            use_async_staging=False,
                            use_non_blocking_copy=cuda,
                        )
                        self._stager = DefaultStager(options)
                    pending.future = dcp.async_save(
                        state,
                        checkpoint_id=pending.tmp,
                        process_group=self.async_group,
                        async_stager=self._stager,
                        no_dist=_no_dist(env),
                    )
                else:
                    dcp.save(state, checkpoint_id=pending.tmp, no_dist=_no_dist(env))
        except (Exception, CheckpointException) as e:  # any failure to write is reported, never fatal here
            error = e
        self._agree_or_raise(error, pending)
        return pending

    def finish(self, pending: PendingSave, before_commit=None) -> Path:
        """Collective. Wait for the shards; each rank checksums its own files; rank 0 gathers
        them into the manifest, renames the directory into place and updates `latest`.
        Raises SaveError."""
        error = None
        try:
            if pending.future is not None:
                pending.future.result()
        except (Exception, CheckpointException) as e:  # reported on every rank below
            error = e
        self._agree_or_raise(error, pending)
        final = self.root / step_name(pending.step)
        env, files, error = self.env, [], None
        try:
            if env.is_main:
                write_json_atomic(pending.tmp / "trainer.json", pending.trainer)
            # every rank fsyncs and checksums the files it wrote, at the same time
            self.progress()  # the shards are written
            files = mf.entries(pending.tmp, mf.share(pending.tmp, env.rank, env.world_size), self.progress)
        except OSError as e:
            error = e
        self._agree_or_raise(error, pending)
        gathered = gather_object(env, files)
        if env.is_main:
            try:
                if before_commit is not None:
                    before_commit(pending.tmp)  # fault injection: die with the shards half-committed
                meta = {"step": pending.step, "world_size": env.world_size, **pending.meta}
                mf.write_manifest(pending.tmp, meta, [e for rank in gathered for e in rank])
                if final.exists():  # saving the same step again (a resumed run): replace it
                    trash = self.root / f".trash-{step_name(pending.step)}"
                    os.replace(final, trash)
                    shutil.rmtree(trash)
                os.replace(pending.tmp, final)
                _fsync_dir(self.root)
                write_atomic(self.root / "latest", f"{pending.step}\n")
                self._retain(newest=pending.step)
            except OSError as e:
                error = e
        self._agree_or_raise(error, pending)
        return final

    def all_written(self, pending: PendingSave) -> bool:
        """Collective: True when every rank's shards of an async save are on disk."""
        return all_ranks_true(self.env, pending.written())

    def _agree_or_raise(self, error: BaseException | None, pending: PendingSave) -> None:
        if all_ranks_true(self.env, error is None):
            return
        why = _reason(error, self.root) if error is not None else "another rank failed to write"
        if self.env.is_main:
            shutil.rmtree(pending.tmp, ignore_errors=True)  # free the space; the last good one stays
        newest = list_checkpoints(self.root)
        kept = (
            f"the previous checkpoint {newest[0][1].name} is kept"
            if newest
            else "there is no earlier checkpoint"
        )
        raise SaveError(f"checkpoint of step {pending.step} failed ({why}); {kept}")

    def _retain(self, newest: int) -> None:
        keep_steps = {s for s, _ in list_checkpoints(self.root)[: self.keep]} | {newest}
        for step, path in list_checkpoints(self.root):
            if step in keep_steps or step > newest:
                continue
            if self.keep_every and step % self.keep_every == 0:
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.info("retention: removed %s", path.name)

    # --- load ----------------------------------------------------------------------------

    def find(self) -> tuple[int, Path] | None:
        """Collective: the newest checkpoint that matches its manifest, on every rank. Rank 0
        checks that each file is there at its size; then every rank checksums its share of
        the files in parallel, and a damaged one, found by any rank, is skipped on all."""
        env = self.env
        candidates = broadcast_object(env, list_checkpoints(self.root) if env.is_main else None)
        for step, path in candidates:
            problem = broadcast_object(env, mf.verify(path, checksums=False) if env.is_main else None)
            if problem is None:
                mine = mf.verify(  # rank 0 has checked every size: each rank hashes its share
                    path, rank=env.rank, world_size=env.world_size, progress=self.progress, sizes=False
                )
                if mine is not None:
                    log.warning("checkpoint %s fails verification on rank %d: %s", path, env.rank, mine)
                if all_ranks_true(env, mine is None):
                    return step, path
                problem = "a file does not match its sha256"
            if env.is_main:
                log.warning("checkpoint %s is unusable (%s); trying the previous one", path, problem)
        return None

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Loaded:
        """Restore model, optimizer and this rank's RNG from a verified checkpoint."""
        options = FLAT if _flat_optimizer(path) else None
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
        with _one_process_ok():
            dcp.load(state, checkpoint_id=path, no_dist=_no_dist(self.env))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=options,
        )
        rng = path / "rng" / f"rank-{self.env.rank:05d}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))
        else:
            log.warning(
                "%s has no RNG state for rank %d (saved with another world size)", path, self.env.rank
            )
        trainer = json.loads((path / "trainer.json").read_text())
        return Loaded(step=int(trainer["step"]), path=path, trainer=trainer)


# The optimizer's state and hyperparameters keyed by parameter name, one entry a parameter.
# Unflattened, param_groups is one object that DCP keeps from rank 0 alone: under pipeline
# parallelism rank 0 holds only the first stage's parameters, and the other stages lose their
# groups' hyperparameters on load (torchtitan saves flat for the same reason).
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _flat_optimizer(path: Path) -> bool:
    """Whether a checkpoint's optimizer state is flat (saved by stratus 0.2 and later)."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return "optim.param_groups.0.params" not in keys  # unflattened groups are numbered


def _reason(error: BaseException, root: Path) -> str:
    """One line for a failed write; DCP wraps each rank's failure with its whole traceback.
    A full disk does not always say so: DCP pickles small objects with torch.save, whose zip
    writer reports a short write as "unexpected pos". The disk's own free space decides."""
    text = str(error)
    if "No space left on device" in text or _disk_full(root):
        return "OSError: [Errno 28] No space left on device"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if isinstance(error, CheckpointException) else f"{type(error).__name__}: {last}"


def _disk_full(root: Path) -> bool:
    try:
        return shutil.disk_usage(root).free < 2**20
    except OSError:
        return False


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model's weights from a checkpoint (inference, export), in one process."""
    state = {"model": get_model_state_dict(model)}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])


def check_same_model(manifest_model: dict[str, Any], config_model: dict[str, Any], path: Path) -> None:
    """Refuse to resume when the config changes the model's shape, naming the keys."""
    diffs = [
        f"model.{k} (checkpoint {manifest_model.get(k)!r}, config {v!r})"
        for k, v in config_model.items()
        if manifest_model.get(k) != v
    ]
    if diffs:
        raise StratusError(
            f"cannot resume from {path}: the config changes the model's shape: {'; '.join(diffs)}. "
            "Use the checkpoint's values, or a new run.dir"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
