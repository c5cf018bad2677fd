"""Memory-mapped token shards and the deterministic sampler.

The data position is a count of global samples. Sample i is the window of seq_len + 1
tokens at window index permute(i mod n_windows; seed, epoch = i // n_windows): every window
is read once per epoch, in an order that is a pure function of (seed, i). At an optimizer
step the global batch holds samples [first, first + global_batch); data-parallel rank r of
dp_size takes the r-th contiguous slice. So a rank's batch at step k depends only on (seed,
k, dp_rank, dp_size) and the manifest, and a resumed run (or a run on another number of
ranks) reads exactly the samples it would have read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stratus.data.manifest import check_shard, read_manifest
from stratus.errors import StratusError


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fast, well-mixed hash of uint64 values (wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(j: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n): a 4-round Feistel network on the smallest even number of
    bits that covers n, cycle-walking values that land outside. O(1) memory for any n."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    base = np.uint64((key * 0x9E3779B97F4A7C15) % 2**64)
    keys = _mix(np.arange(1, 5, dtype=np.uint64) + base)  # array arithmetic wraps silently
    x = j.astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        v = x[todo]
        left, right = v >> np.uint64(half), v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        v = (left << np.uint64(half)) | right
        x[todo] = v
        todo[todo] = v >= np.uint64(n)
    return x.astype(np.int64)


class TokenSplit:
    """One split (train or val) of prepared data: its shards memory-mapped end to end."""

    def __init__(self, data_dir: str | Path, split: str, verify: bool = True, content: str = "tokens"):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        # chat data keeps loss masks and a document index beside the tokens
        shards = [
            s
            for s in self.manifest["shards"]
            if s["split"] == split and s.get("content", "tokens") == content
        ]
        dtype = np.dtype(self.manifest["dtype"] if content == "tokens" else np.uint8)
        self.maps: list[np.ndarray] = []
        for shard in shards:
            check_shard(self.dir, shard, verify)
            self.maps.append(np.memmap(self.dir / shard["file"], dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])  # token offset of each shard
        self.n_tokens = int(self.starts[-1])
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - self.starts[s]
            piece = self.maps[s][offset : offset + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            s += 1
        return out


class Sampler:
    """Maps global sample indices to (input, target) token windows."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, shuffle: bool = True):
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.n_windows = (split.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise StratusError(
                f"the data in {split.dir} has {split.n_tokens} tokens in this split, fewer than one "
                f"sequence of {seq_len} + 1: lower data.seq_len or prepare more text"
            )

    def windows(self, samples: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return samples % self.n_windows
        epoch, j = np.divmod(samples, self.n_windows)
        out = np.empty_like(samples)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute(j[sel], self.n_windows, self.seed * 1_000_003 + int(e))
        return out

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [first, first + count) -> inputs, targets, each (count, seq_len) int64."""
        w = self.windows(np.arange(first, first + count, dtype=np.int64))
        rows = np.stack([self.split.read(int(i) * self.seq_len, self.seq_len + 1) for i in w])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def targets(self, first: int, count: int) -> int:
        """Targets trained on in samples [first, first + count): every one, in plain text."""
        return count * self.seq_len


def rank_micro_batches(
    samples_seen: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[tuple[int, int]]:
    """(first sample, count) of each micro batch this rank runs in the next optimizer step."""
    per_rank = global_batch // dp_size
    first = samples_seen + dp_rank * per_rank
    return [(first + i, micro_batch) for i in range(0, per_rank, micro_batch)]
