"""The measures of `stratus eval --chat` and the embedded chat default they run on: the
doctest harness passes a real function and fails wrong ones, answers are read as code, and
the default's pairs prefer code that parses to code that does not."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from stratus.data.chat_default import functions, has_doctests
from stratus.train.chat_eval import code_of, parses, passes

STATS = Path(sysconfig.get_paths()["stdlib"]) / "statistics.py"


def test_the_doctest_harness_passes_the_real_function_and_fails_wrong_answers():
    median = next(f for f in functions([STATS]) if f.name == "median")
    assert has_doctests(median.conversation()) and median.module == "statistics"
    assert median.request().startswith("Write a Python function `median(data)` that: Return the median")
    assert passes(median, median.source)  # in its module's namespace: it calls the module's helpers
    assert not passes(median, "def median(data):\n    return 0\n")  # runs, gives wrong answers
    assert not passes(median, "def mean(data):\n    return 0\n")  # not the function asked for
    assert not passes(median, "def median(data):\n    while True:\n        pass\n")  # the time limit
    assert not passes(median, median.source[: len(median.source) // 2])  # does not parse


def test_answers_are_read_as_code_and_the_default_pairs_reject_broken_code():
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert code_of("def f(): pass") == "def f(): pass"
    assert parses("def f():\n    return 1\n") and not parses("def f(:\n")
    assert parses("def f():\n    return 1\n", "f") and not parses("# f\n#\n", "f")
    assert not parses("def g():\n    return 1\n", "f")  # parses, but is not what was asked
    for fn in functions([STATS]):
        pair = fn.preference()
        assert pair.prompt[0]["content"] == fn.request()
        assert parses(pair.chosen[0]["content"]) and not parses(pair.rejected[0]["content"])


def test_renamed_copies_ask_for_the_new_name_and_still_pass_their_doctests():
    median = next(f for f in functions([STATS]) if f.name == "median")
    copy = median.renamed("middle_value")
    assert copy.request().startswith("Write a Python function `middle_value(data)` that: Return the median")
    assert copy.source.startswith("def middle_value(data):") and "median(" not in copy.source
    assert ">>> middle_value(" in copy.doc  # its doctests call it by the new name, and pass
    assert passes(copy, copy.source) and not passes(copy, median.source)


def test_renamed_copies_are_trained_on_and_never_of_a_held_out_function(tiny_data: Path, tmp_path: Path):
    """Validation holds the held-out originals alone; training, every other function once as
    it is and RENAMED_COPIES times renamed (a copy of a held-out function would teach it
    under another name)."""
    from stratus.data.chat_default import RENAMED_COPIES
    from stratus.data.prepare_chat import prepare_chat
    from stratus.train.chat_eval import held_out

    m = prepare_chat([], tmp_path / "chat", str(tiny_data / "tokenizer.json"), say=lambda s: None)
    kept_out, total = len(held_out(m["val_fraction"])), len(list(functions()))
    assert m["splits"]["val"]["documents"] == kept_out
    assert m["splits"]["train"]["documents"] == (total - kept_out) * (1 + RENAMED_COPIES)
    assert m["records"]["renamed_copies"] == (total - kept_out) * RENAMED_COPIES
