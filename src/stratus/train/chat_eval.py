"""`stratus eval --chat RUN`: how well a model follows requests of the embedded chat
default, measured, not judged by eye.

- held-out chat loss: the next-token loss on the held-out conversations' assistant tokens;
- parses: the share of answers to held-out requests that `ast.parse` accepts and that
  define the function asked for;
- pass@1: of the held-out functions whose docstrings carry doctests, the share whose greedy
  answer passes them. Each answer runs in a fresh interpreter with a time limit, inside
  its own module's namespace (stdlib functions call their module's helpers), in place of
  the original; only functions whose original source passes the same harness count.

The held-out requests are the ones `stratus prepare --format chat` keeps out of training
(every function with doctests, and the hash-chosen validation share).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from stratus.data.chat_default import Function, functions, has_doctests
from stratus.data.chat_template import find_template
from stratus.data.prepare_chat import in_validation, split_key

TIME_LIMIT_S = 10.0
CONTEXT = 512  # every model is scored at this context (a base model pretrained on less too)
HARNESS = r"""
import doctest, importlib, json, sys
job = json.load(sys.stdin)
ns = dict(vars(importlib.import_module(job["module"])))
ns.pop(job["name"], None)  # the answer must define it: the original is gone
exec(compile(job["answer"], "<answer>", "exec"), ns)
if not callable(ns.get(job["name"])):
    sys.exit(1)
test = doctest.DocTestParser().get_doctest(job["doc"], ns, job["name"], "<doc>", 0)
flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
result = doctest.DocTestRunner(optionflags=flags).run(test, out=lambda s: None)
sys.exit(0 if result.attempted and not result.failed else 1)
"""


def code_of(answer: str) -> str:
    """The code in an answer: inside a ``` fence if it has one."""
    if "```" in answer:
        inside = answer.split("```")[1]
        return inside.removeprefix("python").lstrip("\n")
    return answer


def parses(code: str, name: str | None = None) -> bool:
    """Whether code parses and (given a name) defines that function at its top level: an
    answer of comments or of some other function parses too, but answers nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return name is None or any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def passes(fn: Function, code: str) -> bool:
    job = json.dumps({"module": fn.module, "name": fn.name, "doc": fn.doc, "answer": code})
    try:
        r = subprocess.run(
            [sys.executable, "-I", "-c", HARNESS],
            input=job,
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def held_out(val_fraction: float) -> list[Function]:
    return [
        f
        for f in functions()
        if has_doctests(f.conversation()) or in_validation(split_key(f.conversation()), val_fraction)
    ]


def evaluate_chat(path: str, data: str | None = None, max_tokens: int = 320, limit: int = 0) -> dict:
    from stratus.checkpoint.load import load_trained
    from stratus.data.manifest import read_manifest
    from stratus.data.tokenizer import load_tokenizer
    from stratus.inference.engine import Engine, EngineConfig
    from stratus.inference.request import RequestParams
    from stratus.train.evaluate import evaluate_trained
    from stratus.train.finetune import resized

    loss = evaluate_trained(path, data, seq_len=CONTEXT)
    manifest = read_manifest(loss["data"])
    trained = load_trained(path)
    tokenizer = load_tokenizer(trained.tokenizer_path)
    model = resized(trained.model, tokenizer.get_vocab_size(), CONTEXT)
    template = find_template(Path(path), trained.source, trained.run_dir)
    tests = held_out(float(manifest.get("val_fraction", 0.05)))
    if limit:
        tests = tests[:limit]
    context = CONTEXT
    engine = Engine(model, tokenizer, EngineConfig(max_batch=8, max_queue=len(tests) + 8)).start()
    params = RequestParams(temperature=0.0, stop=template.stop, stop_token_ids=template.stop_ids(tokenizer))

    def answer(fn: Function) -> str:
        text = template.render([{"role": "user", "content": fn.request()}])
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        room = context - len(ids)
        if room < 16:
            return ""  # the request alone fills the context: counted as a failure
        return engine.generate(ids, replace(params, max_tokens=min(max_tokens, room))).text

    try:
        with ThreadPoolExecutor(8) as pool:  # the engine batches concurrent requests
            answers = list(pool.map(answer, tests))
    finally:
        engine.stop()
    codes = [code_of(a) for a in answers]
    doctested = [(f, c) for f, c in zip(tests, codes, strict=True) if has_doctests(f.conversation())]
    runnable = [(f, c) for f, c in doctested if passes(f, f.source)]  # the harness itself works
    passed = sum(passes(f, c) for f, c in runnable)
    return {
        **loss,
        "requests": len(tests),
        "parses": sum(parses(c, f.name) for f, c in zip(tests, codes, strict=True)) / max(1, len(codes)),
        "doctest_functions": len(runnable),
        "pass_at_1": passed / max(1, len(runnable)),
        "example": {"request": tests[0].request(), "answer": answers[0]} if tests else None,
    }
