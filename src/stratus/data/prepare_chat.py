"""`stratus prepare --format chat`: chat JSONL -> tokenizer with the chat tokens, the chat
template, token shards, loss-mask shards and a document index.

Every conversation is rendered with the chat template (data/chat_template.py) and tokenized
whole; the mask marks the tokens the model is trained on (assistant replies and their
end-of-turn token). A preference pair becomes two documents, chosen then rejected, each the
prompt and one answer with only the answer marked. Documents go to train or validation by a
hash of the record, as in plain prepare, and the output appears atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stratus.atomic import atomic_directory, write_json_atomic
from stratus.data.chat_records import ChatRecords, Preference, read_records
from stratus.data.chat_template import CHAT, add_chat_tokens, write_config
from stratus.data.manifest import FORMAT, sha256_file
from stratus.data.prepare import ShardWriter, check_output, collect_sources, unigram_entropy
from stratus.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from stratus.errors import StratusError


def prepare_chat(
    sources: list[str],
    out: str | Path,
    tokenizer_file: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    skip_bad: bool = False,
    preferences: bool = False,
    held_out: Callable[[list[dict]], bool] | None = None,
    shard_tokens: int = 1 << 27,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> dict:
    out = Path(out)
    check_output(out, val_fraction, force)
    tok = load_tokenizer(tokenizer_file) if tokenizer_file else None
    t0 = time.time()
    kind = "preferences" if preferences else "conversations"
    if sources:
        records = read_records(collect_sources(sources), skip_bad, kind)
        labels = list(sources)
    else:
        from stratus.data.chat_default import default_records, has_doctests

        records = ChatRecords(kind, default_records(preferences))
        labels = ["python-stdlib functions"]
        held_out = held_out or has_doctests  # what `stratus eval --chat` runs is never trained on
    if not records.items:
        raise StratusError(
            f"no chat records found ({records.skipped_count} bad lines skipped): give JSONL files "
            'with "messages", "prompt"/"completion" or "chosen"/"rejected" records'
        )
    say(f"read {len(records.items)} {records.kind} ({records.skipped_count} bad lines skipped)")

    docs = _documents(records)
    augmented = 0
    if not sources and not preferences:
        docs_renamed = _renamed_training_copies(val_fraction, held_out)
        docs, augmented = docs + docs_renamed, len(docs_renamed)
        say(f"and {augmented} renamed copies of the training functions")
    if tok is None:
        tok = train_tokenizer((CHAT.render(m, False) for m, _ in docs), vocab_size, length=len(docs))
    added = add_chat_tokens(tok)
    with atomic_directory(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        write_config(tmp, CHAT)
        manifest = _write(records, docs, tok, val_fraction, held_out, shard_tokens, tmp, say)
        manifest["tokenizer"]["sha256"] = sha256_file(tmp / "tokenizer.json")
        manifest["tokenizer"].update(added_tokens=added, trained=not tokenizer_file)
        manifest["sources"] = labels
        manifest["records"]["renamed_copies"] = augmented
        manifest["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _documents(records: ChatRecords) -> list[tuple[list[dict], str]]:
    """(messages, split key) per document: a conversation, or a pair's chosen then rejected
    (both keyed by the pair, so they land in the same split)."""
    docs = []
    for item in records.items:
        if isinstance(item, Preference):
            key = split_key([item.prompt, item.chosen, item.rejected])
            docs += [(item.prompt + item.chosen, key), (item.prompt + item.rejected, key)]
        else:
            docs.append((item, split_key(item)))
    return docs


def _renamed_training_copies(val_fraction: float, held_out) -> list[tuple[list[dict], str]]:
    """The embedded default's functions under other names, for training only: a copy takes
    its original's key, and copies of anything held out are left out, so no held-out
    function is trained on under another name and validation holds originals alone."""
    from stratus.data.chat_default import renamed_conversations

    copies = []
    for renamed, original in renamed_conversations():
        key = split_key(original)
        if not (in_validation(key, val_fraction) or (held_out and held_out(original))):
            copies.append((renamed, key))
    return copies


def split_key(record) -> str:
    """What decides a record's split: its content."""
    return json.dumps(record, sort_keys=True)


def in_validation(key: str, val_fraction: float) -> bool:
    """Whether a record goes to validation: by a hash of its content, as plain prepare does."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h < int(val_fraction * 2**64)


def _write(records, docs, tok, val_fraction, held_out, shard_tokens, tmp: Path, say) -> dict:
    vocab = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    in_val = [in_validation(key, val_fraction) or bool(held_out and held_out(m)) for m, key in docs]
    if val_fraction > 0 and not any(in_val) and len(records.items) > 1:
        in_val = [key == docs[-1][1] for _, key in docs]  # never an empty validation split
    splits, shards = {}, []
    for split, want in (("train", False), ("val", True)):
        tokens = ShardWriter(tmp, split, dtype, shard_tokens)
        masks = ShardWriter(tmp, f"{split}-mask", np.dtype(np.uint8), shard_tokens)
        starts, counts = [], np.zeros(vocab, dtype=np.int64)
        for (messages, _), v in zip(docs, in_val, strict=True):
            if v != want:
                continue
            ids, mask = CHAT.encode(tok, messages)
            ids_a, mask_a = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)
            starts.append(tokens.tokens)
            tokens.add(ids_a)
            masks.add(mask_a)
            counts += np.bincount(ids_a[mask_a.astype(bool)], minlength=vocab)
        index = tmp / f"{split}-docs.bin"
        np.asarray(starts, dtype=np.int64).tofile(index)
        entries = [dict(s, content="tokens") for s in tokens.close()]
        entries += [dict(s, split=split, content="mask") for s in masks.close()]
        entries.append(
            {
                "split": split,
                "content": "docs",
                "file": index.name,
                "tokens": len(starts),
                "bytes": index.stat().st_size,
                "sha256": sha256_file(index),
            }
        )
        shards += entries
        trained = int(counts.sum())
        splits[split] = {
            "documents": len(starts),
            "tokens": tokens.tokens,
            "trained_tokens": trained,
            # the baseline a chat model must beat: the entropy of the replies' tokens alone
            "unigram_entropy": round(unigram_entropy(counts), 4) if trained else None,
        }
        say(f"{split}: {len(starts)} documents, {tokens.tokens:,} tokens, {trained:,} of them trained on")
    return {
        "format": FORMAT,
        "kind": "preferences" if records.kind == "preferences" else "chat",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "records": {
            "read": len(records.items),
            "skipped": records.skipped_count,
            "skipped_lines": records.skipped,
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "vocab_size": vocab,
            "eos_id": eos_id(tok),
            "end_of_turn_id": CHAT.stop_ids(tok)[0],
        },
        "chat_template": "tokenizer_config.json",
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "splits": splits,
        "shards": shards,
    }
