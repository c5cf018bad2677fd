"""prepare: manifest, checksums, split, bad input; loader: determinism and rank slicing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stratus.data.loader import Sampler, TokenSplit, permute, rank_micro_batches
from stratus.data.manifest import sha256_file
from stratus.data.prepare import prepare, stdlib_sources
from stratus.data.tokenizer import EOS, load_tokenizer
from stratus.errors import StratusError
from tests.conftest import run_cli, write_corpus


def quiet(_: str) -> None:
    pass


def test_manifest_describes_the_shards(tiny_data: Path):
    m = json.loads((tiny_data / "manifest.json").read_text())
    assert m["dtype"] == "uint16"
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 24
    assert m["splits"]["val"]["documents"] >= 1
    assert m["tokenizer"]["sha256"] == sha256_file(tiny_data / "tokenizer.json")
    for split in ("train", "val"):
        shards = [s for s in m["shards"] if s["split"] == split]
        assert sum(s["tokens"] for s in shards) == m["splits"][split]["tokens"]
        for s in shards:
            path = tiny_data / s["file"]
            assert path.stat().st_size == s["bytes"] == 2 * s["tokens"]
            assert sha256_file(path) == s["sha256"]
    # the unigram baseline is a real entropy: positive and below log(vocab)
    assert 0 < m["splits"]["train"]["unigram_entropy"] < np.log(m["tokenizer"]["vocab_size"])


def test_shards_decode_back_to_the_documents(tiny_data: Path, tmp_path: Path):
    corpus = {p.read_text() for p in write_corpus(tmp_path / "c").iterdir()}
    tok = load_tokenizer(tiny_data / "tokenizer.json")
    eos = tok.token_to_id(EOS)
    seen = []
    for split in ("train", "val"):
        ids = TokenSplit(tiny_data, split).read(0, TokenSplit(tiny_data, split).n_tokens)
        assert ids[-1] == eos  # every document ends with end-of-text
        docs = np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]
        seen += [tok.decode(d[:-1].tolist()) for d in docs]
    assert sorted(seen) == sorted(corpus)


def test_split_depends_on_content_not_names(tmp_path: Path):
    a = write_corpus(tmp_path / "a", 30)
    b = tmp_path / "b"
    b.mkdir()
    for i, p in enumerate(sorted(a.iterdir(), reverse=True)):  # other names, other order
        shutil.copy(p, b / f"renamed_{i:03d}.txt")
    ma = prepare([str(a)], tmp_path / "da", vocab_size=300, val_fraction=0.2, say=quiet)
    mb = prepare([str(b)], tmp_path / "db", vocab_size=300, val_fraction=0.2, say=quiet)
    val = lambda d: TokenSplit(d, "val").read(0, TokenSplit(d, "val").n_tokens)  # noqa: E731
    assert ma["splits"]["val"] == mb["splits"]["val"]
    assert sorted(val(tmp_path / "da").tolist()) == sorted(val(tmp_path / "db").tolist())


def test_non_utf8_file_is_skipped_and_counted(tmp_path: Path):
    corpus = write_corpus(tmp_path / "c", 4)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    m = prepare([str(corpus)], tmp_path / "d", vocab_size=300, say=quiet)
    assert m["files"]["skipped"] == 1 and m["files"]["read"] == 4
    assert m["files"]["skipped_files"][0]["path"].endswith("latin1.txt")
    assert "UTF-8" in m["files"]["skipped_files"][0]["reason"]
    with pytest.raises(StratusError, match="latin1.txt"):
        prepare([str(corpus)], tmp_path / "strict", vocab_size=300, strict=True, say=quiet)
    assert not (tmp_path / "strict").exists()


def test_empty_corpus_is_refused_and_nothing_is_written(tmp_path: Path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "blank.py").write_text("\n   \n")
    (corpus / "binary.bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(StratusError, match="empty"):
        prepare([str(corpus)], tmp_path / "out", vocab_size=300, say=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_bad_sources_and_existing_output(tmp_path: Path, tiny_data: Path):
    with pytest.raises(StratusError, match="not found"):
        prepare([str(tmp_path / "missing")], tmp_path / "o", say=quiet)
    with pytest.raises(StratusError, match="matches no file"):
        prepare([str(tmp_path / "*.nothing")], tmp_path / "o", say=quiet)
    with pytest.raises(StratusError, match="--force"):
        prepare([str(tmp_path)], tiny_data, say=quiet)


def test_given_tokenizer_is_reused(tmp_path: Path, tiny_data: Path):
    corpus = write_corpus(tmp_path / "c", 6)
    m = prepare([str(corpus)], tmp_path / "d", tokenizer_file=str(tiny_data / "tokenizer.json"), say=quiet)
    assert m["tokenizer"]["trained"] is False
    assert m["tokenizer"]["sha256"] == sha256_file(tiny_data / "tokenizer.json")


def test_corrupted_shard_is_refused_naming_it(tmp_path: Path, tiny_data: Path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # same size, different content: only the checksum can tell
    shard.write_bytes(bytes(raw))
    with pytest.raises(StratusError, match="train-00000.bin.*sha256"):
        TokenSplit(data, "train", verify=True)
    shard.write_bytes(bytes(raw[:-2]))  # truncated: refused even without the checksum pass
    with pytest.raises(StratusError, match="train-00000.bin.*bytes"):
        TokenSplit(data, "train", verify=False)


def test_train_refuses_corrupt_shard_through_the_cli(tmp_path: Path, tiny_data: Path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    with open(data / "val-00000.bin", "r+b") as f:
        f.write(b"\x00\x01\x02\x03")
    r = run_cli(
        "train",
        f"--data.path={data}",
        f"--run.dir={tmp_path / 'run'}",
        "--train.steps=1",
        "--eval.interval=1",
        "--model.max_seq_len=64",
        "--data.seq_len=32",
    )
    assert r.returncode == 2, r.stderr
    # the background check (or, for a short run, the check before it reports success) names it
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stratus: error: shard") and "val-00000.bin" in last and "sha256" in last
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))  # nothing saved from damaged data


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 100, 1000, 4097):
        for key in (0, 1, 12345):
            assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n))
    assert permute(np.arange(100), 100, 1).tolist() != permute(np.arange(100), 100, 2).tolist()


def test_batches_are_a_pure_function_of_seed_step_and_rank(tiny_data: Path):
    split = TokenSplit(tiny_data, "train")
    a, b = Sampler(split, 16, seed=7), Sampler(TokenSplit(tiny_data, "train"), 16, seed=7)
    for first in (0, 5, 1000):
        xa, ya = a.batch(first, 4)
        xb, yb = b.batch(first, 4)
        assert xa.equal(xb) and ya.equal(yb)
        assert xa[:, 1:].equal(ya[:, :-1])  # targets are inputs shifted by one
    assert not Sampler(split, 16, seed=8).batch(0, 4)[0].equal(a.batch(0, 4)[0])

    # every window is read exactly once per epoch, and the next epoch reorders them
    epoch = a.windows(np.arange(a.n_windows))
    assert sorted(epoch.tolist()) == list(range(a.n_windows))
    assert a.windows(np.arange(a.n_windows, 2 * a.n_windows)).tolist() != epoch.tolist()


def test_ranks_split_the_global_batch(tiny_data: Path):
    sampler = Sampler(TokenSplit(tiny_data, "train"), 16, seed=3)
    step, global_batch = 5, 8
    one = rank_micro_batches(step * global_batch, global_batch, 4, 0, 1)
    two = [mb for r in range(2) for mb in rank_micro_batches(step * global_batch, global_batch, 2, r, 2)]
    rows = lambda mbs: np.concatenate([sampler.batch(f, c)[0].numpy() for f, c in mbs])  # noqa: E731
    assert rows(one).tolist() == rows(two).tolist()
    assert sum(c for _, c in one) == global_batch


def test_default_corpus_is_the_stdlib():
    files = stdlib_sources()
    assert len(files) > 500
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    assert files == sorted(files)


def test_background_verification_splits_the_shards_over_ranks(tmp_path: Path, tiny_data: Path):
    """Each rank checksums its share (shard i on rank i mod world): a damaged first shard is
    found by rank 0 of 2, and not by rank 1, which never reads it for checking."""
    import torch

    from stratus.data.manifest import read_manifest
    from stratus.data.verify import ShardVerifier
    from stratus.distributed.env import DistEnv

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shards = read_manifest(data)["shards"]
    first = data / shards[0]["file"]
    raw = bytearray(first.read_bytes())
    raw[3] ^= 0xFF
    first.write_bytes(bytes(raw))
    # each as rank r of 2 would run it, agreeing only with itself (no process group here)
    alone = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ShardVerifier(data, shards, rank=1, world_size=2).agree(alone, wait=True)  # not its share
    with pytest.raises(StratusError, match=f"{shards[0]['file']}.*sha256"):
        ShardVerifier(data, shards, rank=0, world_size=2).agree(alone, wait=True)
