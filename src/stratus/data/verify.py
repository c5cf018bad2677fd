"""Data shards checksummed off the start path: each rank hashes its share of the shards
(shard i on rank i mod world) in a background thread while training runs, so the corpus is
read once per job, spread over the ranks, and start-up costs a stat per shard, not a pass
over terabytes. A damaged shard stops the run with one clear error at the next batch (or,
at the latest, before the run reports success)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from stratus.data.manifest import check_shard
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
            except OSError as e:
                self.problem = (
                    f"shard {self._dir / shard['file']} cannot be read ({e}): prepare the data again"
                )
                return

    def check(self) -> None:
        """Raise if this rank's verification has found a damaged shard so far."""
        if self.problem:
            raise StratusError(self.problem)

    def wait(self) -> None:
        """Finish this rank's share, then raise if a shard is damaged."""
        self._thread.join()
        self.check()
