"""The embedded chat default, built from this interpreter's standard library: each public
function with a docstring becomes a request for it ("Write a Python function `name(args)`
that: <docstring>") answered with its source. Preference pairs prefer that source to a
broken variant of it: the same function cut off halfway, which does not parse.

Each training function is also seen again under other names, request and source alike:
with the originals alone a small model recalls names from docstrings instead of copying
the one it is asked for (the demo's SFT model named `count_vowels` `icoys`).

Present on every machine that runs stratus, so fine-tuning needs nothing from outside,
and measurable: an answer parses with `ast.parse` or not, and functions whose docstrings
carry doctests can be run (`stratus eval --chat`).
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stratus.data.chat_records import Messages, Preference
from stratus.data.prepare import stdlib_sources

MAX_SOURCE_CHARS = 1000  # a request and its answer fit a context of 512 tokens
MIN_DOC_CHARS = 20
RENAMED_COPIES = 3  # each training function seen again under this many other names


@dataclass
class Function:
    name: str
    signature: str  # name(args)
    doc: str
    source: str
    path: str
    module: str  # its dotted module name, for running it where it lives

    def request(self) -> str:
        return f"Write a Python function `{self.signature}` that: {self.doc}"

    def conversation(self) -> Messages:
        return [{"role": "user", "content": self.request()}, {"role": "assistant", "content": self.source}]

    def renamed(self, name: str) -> Function:
        """The same function called `name` wherever code calls it by name: its `def`, its
        recursive calls, its doctests. Prose is left alone (`median` renamed still returns
        "the median")."""
        own = re.compile(rf"\b{re.escape(self.name)}(?=\()")
        return Function(
            name,
            own.sub(name, self.signature, count=1),
            own.sub(name, self.doc),
            own.sub(name, self.source),
            self.path,
            self.module,
        )

    def preference(self) -> Preference:
        lines = self.source.splitlines()
        broken = "\n".join(lines[: max(1, len(lines) // 2)])
        if _parses(broken):  # a cut at a statement boundary can still parse: break it plainly
            broken = broken.rstrip() + " ("
        return Preference(
            [{"role": "user", "content": self.request()}],
            [{"role": "assistant", "content": self.source}],
            [{"role": "assistant", "content": broken}],
        )


def _parses(text: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    try:
        parts = list(path.relative_to(root).with_suffix("").parts)
    except ValueError:
        return path.stem
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo"}  # test suites: few docstrings, much text


def functions(paths: list[Path] | None = None) -> Iterator[Function]:
    """Public module-level functions with a docstring and a short enough source (by default,
    the standard library's, parsed once a process)."""
    if paths is None:
        return iter(_stdlib_functions())
    return _functions(paths)


@functools.cache
def _stdlib_functions() -> tuple[Function, ...]:
    return tuple(_functions([p for p in stdlib_sources() if not SKIP_DIRS & set(p.parts)]))


def _functions(paths: list[Path]) -> Iterator[Function]:
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < MIN_DOC_CHARS or node.decorator_list:  # decorated: not a plain function
                continue
            # the cheap tests first: get_source_segment splits the whole file into lines each call
            source = ast.get_source_segment(text, node)
            if not source or len(source) > MAX_SOURCE_CHARS:
                continue
            yield Function(
                node.name,
                f"{node.name}({ast.unparse(node.args)})",
                textwrap.dedent(doc).strip(),
                source,
                str(path),
                module_name(path),
            )


def renamed_conversations(copies: int = RENAMED_COPIES) -> list[tuple[Messages, Messages]]:
    """(renamed conversation, the original's) for every function, `copies` times each. The
    new names join two or three words of standard-library function names (`parse_vowels`),
    never a word the function's source already uses, drawn from a fixed seed."""
    funcs = list(functions())
    words = sorted({w for f in funcs for w in f.name.split("_") if len(w) > 1 and w.isalpha()})
    rng = random.Random(0)
    out = []
    for f in funcs:
        used = set(re.findall(r"\w+", f.source))
        for _ in range(copies):
            name = f.name
            while name in used:
                name = "_".join(rng.sample(words, rng.choice((2, 3)))).lower()
            out.append((f.renamed(name).conversation(), f.conversation()))
    return out


def has_doctests(messages: Messages) -> bool:
    """A request whose docstring carries doctests: held out, for pass@1."""
    return ">>>" in messages[0]["content"]


def default_records(preferences: bool) -> list:
    """Conversations or preference pairs of the embedded default, in a stable order."""
    return [f.preference() if preferences else f.conversation() for f in functions()]
