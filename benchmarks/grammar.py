"""Constrained decoding's cost: the grammar libraries that could enforce `response_format`,
measured on the served tokenizer, so the choice in inference/grammar.py is a measurement.

For each library and schema: the compile time (once per distinct schema) and the time to
compute one token mask (once per constrained row per step), along a real valid JSON
document tokenized by the tokenizer. llguidance and outlines-core have no dependencies
beyond themselves; xgrammar pulls triton and transformers, so it is reported as not run
when it is not installed.

    python benchmarks/grammar.py --tokenizer RUN/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tokenizers import Tokenizer

from stratus.inference.detok import token_bytes

SCHEMAS = {
    "object": {"type": "object"},
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "city": {"enum": ["Paris", "Oslo", "Lima"]},
        },
        "required": ["name", "age", "tags", "city"],
        "additionalProperties": False,
    },
}
DOCS = {
    "object": '{"a": [1, 2, {"b": "hello world"}], "c": null, "d": true}',
    "person": '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"], "city": "Oslo"}',
}


def run_llguidance(tok: Tokenizer, eos: int, schema: dict, ids: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.torch as llt

    lt = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=eos)
    mask = llt.allocate_token_bitmask(1, tok.get_vocab_size())
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    m = llguidance.LLMatcher(lt, grammar)
    compile_s = time.perf_counter() - t0
    assert not m.is_error(), m.get_error()
    per = []
    for i in ids:
        t = time.perf_counter()
        llt.fill_next_token_bitmask(m, mask)
        per.append(time.perf_counter() - t)
        assert m.consume_token(i), f"llguidance refused token {i}"
    return compile_s, per


def run_outlines(tok: Tokenizer, eos: int, schema: dict, ids: list[int]) -> tuple[float, list[float]]:
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    special = set(tok.get_added_tokens_decoder())  # end-of-text and chat markers: never part of JSON
    vocab: dict[bytes, list[int]] = {}
    for i in range(tok.get_vocab_size()):
        if i not in special:
            vocab.setdefault(token_bytes(tok, i), []).append(i)
    mask = torch.zeros((tok.get_vocab_size() + 31) // 32, dtype=torch.int32)
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), Vocabulary(eos, vocab))
    guide = Guide(index)
    compile_s = time.perf_counter() - t0
    per = []
    for i in ids:
        t = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        per.append(time.perf_counter() - t)
        guide.advance(i)
    return compile_s, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="a run's tokenizer.json")
    args = ap.parse_args()
    tok = Tokenizer.from_file(str(args.tokenizer))
    eos = tok.token_to_id("<|endoftext|>")
    libs = {"llguidance": run_llguidance, "outlines-core": run_outlines}
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        print("xgrammar: not installed (it pulls triton and transformers); not measured")
    print(f"tokenizer {args.tokenizer}: {tok.get_vocab_size()} tokens")
    print(f"{'library':<14} {'schema':<8} {'compile ms':>10} {'mask us p50':>12} {'mask us p99':>12}")
    for lib, fn in libs.items():
        for name, schema in SCHEMAS.items():
            ids = tok.encode(DOCS[name], add_special_tokens=False).ids
            try:
                compile_s, per = fn(tok, eos, schema, ids)
            except Exception as e:  # one library's failure is a finding, not the end of the run
                print(f"{lib:<14} {name:<8} failed: {e!r}"[:200])
                continue
            per.sort()
            p50 = statistics.median(per) * 1e6
            p99 = per[min(len(per) - 1, int(0.99 * len(per)))] * 1e6
            print(f"{lib:<14} {name:<8} {compile_s * 1e3:>10.1f} {p50:>12.1f} {p99:>12.1f}")


if __name__ == "__main__":
    main()
