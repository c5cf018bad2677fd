"""Data shards checksummed off the start path: each rank hashes its share of the shards
(shard i on rank i mod world) in a background thread while training runs, so the corpus is
read once per job, spread over the ranks, and start-up costs a stat per shard, not a pass
over terabytes. The ranks agree on what was found at each logged step, and before the last
checkpoint after waiting for every share: a damaged shard stops every rank with the same
error line."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from stratus.data.manifest import check_shard
from stratus.distributed.env import DistEnv, all_ranks_true, broadcast_object, gather_object
from stratus.errors import StratusError


class ShardVerifier:
    def __init__(self, data_dir: Path, shards: list[dict[str, Any]], rank: int, world_size: int):
        self.problem: str | None = None
        self._mine = shards[rank::world_size]
        self._dir = data_dir
        self._thread = threading.Thread(target=self._run, name="stratus-shard-verifier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for shard in self._mine:
            try:
                check_shard(self._dir, shard, verify_checksum=True)
            except StratusError as e:
                self.problem = str(e)
                return
            except Exception as e:  # an unreadable file, a malformed entry: never lost in the thread
                where = self._dir / str(shard.get("file", "?"))
                self.problem = f"shard {where} cannot be checked ({e}): prepare the data again"
                return

    def agree(self, env: DistEnv, wait: bool = False) -> None:
        """Collective: raise the same StratusError on every rank if any rank's verification
        has found a damaged shard (so far, or with wait, once every share is done)."""
        if wait:
            self._thread.join()
        if all_ranks_true(env, self.problem is None):
            return
        problems = broadcast_object(env, [p for p in gather_object(env, self.problem) or [] if p])
        raise StratusError(problems[0])
