"""`stratus prepare`: text files -> tokenizer + token shards + manifest.json.

Documents are whole files. Each document goes to train or validation by a hash of its text,
so the split does not depend on the order or number of sources. Every document is followed
by the end-of-text token. The output is assembled in a temporary directory next to --out and
renamed into place at the end, so a failed or interrupted prepare leaves nothing behind.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stratus.atomic import atomic_directory, write_json_atomic
from stratus.data.chat_template import BASE, write_config
from stratus.data.manifest import FORMAT, sha256_file
from stratus.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from stratus.errors import StratusError

ENCODE_BATCH = 256  # documents per encode_batch call (tokenized in parallel by the Rust side)
MAX_LISTED_SKIPS = 100


def stdlib_sources() -> list[Path]:
    """The embedded default corpus: every .py file of this interpreter's standard library,
    sorted, site-packages excluded. Present on every machine that runs stratus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )


def collect_sources(sources: list[str]) -> list[Path]:
    """Paths, directories (every file below, recursively) and globs -> sorted unique files."""
    files: set[Path] = set()
    for src in sources:
        if glob.has_magic(src):
            matched = [Path(m) for m in glob.glob(src, recursive=True)]
            if not matched:
                raise StratusError(f"source pattern {src!r} matches no file")
            files.update(m for m in matched if m.is_file())
        elif Path(src).is_dir():
            files.update(p for p in Path(src).rglob("*") if p.is_file())
        elif Path(src).is_file():
            files.add(Path(src))
        else:
            raise StratusError(f"source {src} not found: give files, directories or glob patterns")
    return sorted(files)


@dataclass
class Corpus:
    documents: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    empty: int = 0


def read_corpus(paths: list[Path], strict: bool) -> Corpus:
    corpus = Corpus()
    for path in paths:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"not UTF-8 (byte {e.start})"
        except OSError as e:
            reason = f"unreadable ({e.strerror})"
        else:
            if text.strip():
                corpus.documents.append(text)
            else:
                corpus.empty += 1
            continue
        if strict:
            raise StratusError(f"{path}: {reason}; remove it, or drop --strict to skip such files")
        corpus.skipped.append({"path": str(path), "reason": reason})
    return corpus


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of train and validation documents, chosen by hash of content."""
    hashes = [_doc_hash(d) for d in docs]
    threshold = int(val_fraction * 2**64)
    val = [i for i, h in enumerate(hashes) if h < threshold]
    if not val and len(docs) > 1 and val_fraction > 0:
        val = [min(range(len(docs)), key=hashes.__getitem__)]  # never an empty validation split
    chosen = set(val)
    return [i for i in range(len(docs)) if i not in chosen], val


class ShardWriter:
    """Streams tokens into fixed-size shard files of one split, hashing as it writes."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.tokens = 0
        self.counts: np.ndarray | None = None

    def add(self, ids: np.ndarray) -> None:
        self._buf.append(ids.astype(self.dtype, copy=False))
        self._buffered += len(ids)
        self.tokens += len(ids)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict]:
        if self._buffered:
            self._flush(self._buffered)
        return self.shards

    def _flush(self, n: int) -> None:
        data = np.concatenate(self._buf)
        shard, rest = data[:n], data[n:]
        self._buf, self._buffered = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}-{len(self.shards):05d}.bin"
        path = self.out / name
        shard.tofile(path)
        self.shards.append(
            {
                "split": self.split,
                "file": name,
                "tokens": int(n),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of the unigram distribution: the loss of the best model that
    ignores context, the baseline a trained model must beat."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def check_output(out: Path, val_fraction: float, force: bool) -> None:
    """Refuse, before any work, a bad split share or an --out that holds something else."""
    if not 0 <= val_fraction < 1:
        raise StratusError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if (out / "manifest.json").exists() and not force:
        raise StratusError(f"{out} already holds prepared data: use --force to replace it, or another --out")
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise StratusError(f"{out} exists and is not prepared data: give an empty or new --out directory")


def prepare(
    sources: list[str],
    out: str | Path,
    vocab_size: int = 4096,
    tokenizer_file: str | None = None,
    val_fraction: float = 0.01,
    strict: bool = False,
    shard_tokens: int = 1 << 27,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> dict:
    """Prepare a corpus; returns the manifest. Raises StratusError on bad input."""
    out = Path(out)
    check_output(out, val_fraction, force)
    tok = load_tokenizer(tokenizer_file) if tokenizer_file else None  # fail fast, before reading

    t0 = time.time()
    if sources:
        paths, labels = collect_sources(sources), list(sources)
    else:
        paths = stdlib_sources()
        labels = [f"python-stdlib:{sysconfig.get_paths()['stdlib']}"]
    corpus = read_corpus(paths, strict)
    if not corpus.documents:
        raise StratusError(
            f"the corpus is empty: {len(paths)} files found, {len(corpus.skipped)} skipped, "
            "none with text; give files with UTF-8 text"
        )
    say(
        f"read {len(corpus.documents)} documents ({sum(map(len, corpus.documents)) / 1e6:.1f}M characters) "
        f"from {len(paths)} files; skipped {len(corpus.skipped)} unreadable, {corpus.empty} empty"
    )

    with atomic_directory(out) as tmp:
        manifest = _build(corpus, tok, vocab_size, val_fraction, shard_tokens, tmp, say)
        manifest["sources"] = labels
        manifest["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(tmp / "manifest.json", manifest)  # last: its presence means complete
    return manifest


def _build(corpus, tok, vocab_size, val_fraction, shard_tokens, tmp: Path, say) -> dict:
    docs = corpus.documents
    train_idx, val_idx = split_documents(docs, val_fraction)
    trained = tok is None
    if tok is None:
        t = time.time()
        tok = train_tokenizer((docs[i] for i in train_idx), vocab_size, length=len(train_idx))
        say(f"trained a byte-level BPE tokenizer of {tok.get_vocab_size()} tokens in {time.time() - t:.0f}s")
    tok.save(str(tmp / "tokenizer.json"))
    write_config(tmp, BASE)  # a base model's chat contract: the plain transcript
    vocab = tok.get_vocab_size()
    eos = eos_id(tok)
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)

    splits = {}
    shards: list[dict] = []
    for split, idx in (("train", train_idx), ("val", val_idx)):
        writer = ShardWriter(tmp, split, dtype, shard_tokens)
        counts = np.zeros(vocab, dtype=np.int64)
        for ids in _encode(tok, docs, idx, eos):
            writer.add(ids)
            counts += np.bincount(ids, minlength=vocab)
        shards += writer.close()
        splits[split] = {
            "documents": len(idx),
            "tokens": writer.tokens,
            "unigram_entropy": round(unigram_entropy(counts), 4) if writer.tokens else None,
        }
        say(f"{split}: {len(idx)} documents, {writer.tokens:,} tokens")
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {
            "read": len(docs),
            "empty": corpus.empty,
            "skipped": len(corpus.skipped),
            "skipped_files": corpus.skipped[:MAX_LISTED_SKIPS],
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": sha256_file(tmp / "tokenizer.json"),
            "vocab_size": vocab,
            "eos_id": eos,
            "trained": trained,
        },
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "splits": splits,
        "shards": shards,
    }


def _encode(tok, docs: list[str], idx: list[int], eos: int) -> Iterator[np.ndarray]:
    for start in range(0, len(idx), ENCODE_BATCH):
        batch = [docs[i] for i in idx[start : start + ENCODE_BATCH]]
        encodings = tok.encode_batch(batch, add_special_tokens=False)
        yield np.concatenate([np.append(np.asarray(e.ids, dtype=np.int64), eos) for e in encodings])
