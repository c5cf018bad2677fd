"""Chat data for training: whole conversations packed into rows, with a loss mask and a
document index so that attention stays inside each conversation.

Rows of seq_len + 1 tokens are filled greedily with whole documents in stored order (a
document longer than a row is cut to one row), and the rest of a row is padding that is
never trained on. Which rows exist is a pure function of the data and seq_len; sample i is
row permute(i mod rows; seed, epoch) as in loader.Sampler, so the data position, resume and
every layout behave exactly as in pretraining. Targets the model is not trained on (prompts,
padding, a document's first token) are IGNORE, which cross-entropy skips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stratus.data.loader import Sampler, TokenSplit
from stratus.errors import StratusError

IGNORE = -100  # torch's cross_entropy ignore_index


class ChatDocuments:
    """The documents of one split of chat data: tokens, trained-on mask, start offsets;
    each cut to at most `limit` tokens."""

    def __init__(self, data_dir: str | Path, split: str, limit: int):
        self.tokens = TokenSplit(data_dir, split, verify=False)
        self.masks = TokenSplit(data_dir, split, verify=False, content="mask")
        shards = self.tokens.manifest["shards"]
        index = [s for s in shards if s["split"] == split and s.get("content") == "docs"]
        if not index:
            raise StratusError(
                f"{data_dir} holds no chat documents: prepare it with `stratus prepare --format chat`"
            )
        self.start = np.fromfile(Path(data_dir) / index[0]["file"], dtype=np.int64)
        full = np.append(self.start[1:], self.tokens.n_tokens) - self.start
        self.length = np.minimum(full, limit)
        self.truncated = int((full > limit).sum())
        self.pad = int(self.tokens.manifest["tokenizer"]["eos_id"])

    def __len__(self) -> int:
        return len(self.start)

    def read(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        s, n = int(self.start[d]), int(self.length[d])
        return self.tokens.read(s, n), self.masks.read(s, n).astype(bool)

    def trained(self, chunk_tokens: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
        """Trained-on tokens of each document (as cut), and whether its first token is
        trained on. One sequential pass over the masks, a chunk of documents at a time, so
        start-up costs a read of the masks, not a Python step per document."""
        counts = np.zeros(len(self), dtype=np.int64)
        first = np.zeros(len(self), dtype=np.int64)
        d = 0
        while d < len(self):
            base = int(self.start[d])
            # the documents that start within this chunk (at least one)
            e = max(d + 1, int(np.searchsorted(self.start, base + chunk_tokens, side="left")))
            ends = self.start[d:e] - base + self.length[d:e]
            mask = self.masks.read(base, int(ends.max())).astype(np.int64)
            cum = np.concatenate([[0], np.cumsum(mask)])
            begins = self.start[d:e] - base
            counts[d:e] = cum[ends] - cum[begins]
            first[d:e] = mask[begins]
            d = e
        return counts, first


class ChatSampler(Sampler):
    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int, shuffle: bool = True):
        self.docs = ChatDocuments(data_dir, split, seq_len + 1)
        self.split, self.seq_len, self.seed, self.shuffle = self.docs.tokens, seq_len, seed, shuffle
        self.truncated = self.docs.truncated
        self.row_first = self._pack(self.docs.length, seq_len + 1)  # first document of each row
        self.n_windows = len(self.row_first)
        if self.n_windows < 1:
            raise StratusError(f"the {split} split of {data_dir} holds no conversation")
        self.padding = 1 - self.docs.length.sum() / (self.n_windows * (seq_len + 1))
        # a row's first token is never a target
        trained, first_trained = self.docs.trained()
        self._row_targets = np.add.reduceat(trained, self.row_first) - first_trained[self.row_first]

    def describe(self) -> str:
        return (
            f"{len(self.docs)} conversations packed into {self.n_windows} rows of {self.seq_len + 1} "
            f"tokens ({100 * self.padding:.1f}% padding, {self.truncated} cut to fit)"
        )

    @staticmethod
    def _pack(lengths: np.ndarray, row: int) -> np.ndarray:
        firsts, used = [], row
        for i, n in enumerate(lengths.tolist()):
            if used + n > row:
                firsts.append(i)
                used = 0
            used += n
        return np.asarray(firsts, dtype=np.int64)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, trained-on mask and document number of row r, seq_len + 1 each."""
        n = self.seq_len + 1
        tokens = np.full(n, self.docs.pad, dtype=np.int64)
        mask = np.zeros(n, dtype=bool)
        doc = np.zeros(n, dtype=np.int64)
        end = self.row_first[r + 1] if r + 1 < self.n_windows else len(self.docs)
        at = 0
        for k, d in enumerate(range(int(self.row_first[r]), int(end))):
            t, m = self.docs.read(d)
            tokens[at : at + len(t)], mask[at : at + len(t)], doc[at : at + len(t)] = t, m, k
            at += len(t)
        doc[at:] = doc[at - 1] + 1 if at else 0  # padding: a document of its own
        return tokens, mask, doc

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Samples [first, first + count) -> inputs, targets (IGNORE where not trained on) and
        document numbers, each (count, seq_len)."""
        rows = [self.row(int(r)) for r in self.windows(np.arange(first, first + count, dtype=np.int64))]
        tokens = torch.from_numpy(np.stack([t for t, _, _ in rows]))
        mask = torch.from_numpy(np.stack([m for _, m, _ in rows]))
        doc = torch.from_numpy(np.stack([d for _, _, d in rows]))
        targets = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
        return tokens[:, :-1], targets, doc[:, :-1]

    def targets(self, first: int, count: int) -> int:
        return int(self._row_targets[self.windows(np.arange(first, first + count, dtype=np.int64))].sum())


class PairSampler(Sampler):
    """Preference pairs for DPO: sample i is pair permute(i mod pairs), as two rows (chosen
    then rejected), each one document padded to seq_len + 1, trained on the answer only. A
    row holds one document followed by padding, so plain causal attention keeps them apart."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int, shuffle: bool = True):
        self.docs = ChatDocuments(data_dir, split, seq_len + 1)
        self.split, self.seq_len, self.seed, self.shuffle = self.docs.tokens, seq_len, seed, shuffle
        self.truncated = self.docs.truncated
        self.n_windows = len(self.docs) // 2
        if self.n_windows < 1:
            raise StratusError(f"the {split} split of {data_dir} holds no preference pair")

    def describe(self) -> str:
        return f"{self.n_windows} pairs, {self.truncated} answers cut to {self.seq_len + 1} tokens"

    def _row(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.seq_len + 1
        tokens, mask = np.full(n, self.docs.pad, dtype=np.int64), np.zeros(n, dtype=bool)
        t, m = self.docs.read(d)
        tokens[: len(t)], mask[: len(t)] = t, m
        return tokens, mask

    def pairs(self, pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs and targets of the given pairs, (2 x pairs, seq_len), chosen and rejected
        interleaved, and the pair numbers."""
        rows = [self._row(2 * int(p) + k) for p in pairs for k in (0, 1)]
        tokens = torch.from_numpy(np.stack([t for t, _ in rows]))
        mask = torch.from_numpy(np.stack([m for _, m in rows]))
        targets = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
        return tokens[:, :-1], targets, torch.from_numpy(np.asarray(pairs, dtype=np.int64))

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pairs(self.windows(np.arange(first, first + count, dtype=np.int64)))

    def targets(self, first: int, count: int) -> int:
        return count  # DPO's loss is a mean over pairs
