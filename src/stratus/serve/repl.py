"""`stratus chat`: a terminal conversation with a model, streamed token by token.

The engine runs in this process (no server); the conversation is rendered with the same
chat template as the server's /v1/chat/completions. When the conversation outgrows the
context, the oldest turns are dropped (the system message stays).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from stratus.data.chat_template import ChatTemplate
from stratus.inference.engine import Engine
from stratus.inference.request import RequestParams

HELP = """commands:
  /reset                 forget the conversation (the system message stays)
  /system TEXT           set the system message (empty: none) and reset
  /set NAME VALUE        temperature, top_p, top_k, max_tokens, seed, presence_penalty, frequency_penalty
  /settings              show the sampling settings
  /help                  this list
  /quit                  leave (Ctrl-D too); Ctrl-C stops a reply"""

SETTINGS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_tokens": int,
    "seed": int,
    "presence_penalty": float,
    "frequency_penalty": float,
}


class ChatSession:
    def __init__(self, engine: Engine, template: ChatTemplate, params: RequestParams, system: str = ""):
        self.engine, self.template = engine, template
        self.params = replace(
            params,
            stop=tuple(params.stop) + template.stop,
            stop_token_ids=template.stop_ids(engine.tokenizer),
        )
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self, max_tokens: int) -> list[int]:
        """The conversation as tokens, oldest turns dropped until max_tokens more fit."""
        tok, eos = self.engine.tokenizer, self.engine.eos
        while True:
            ids = tok.encode(self.template.render(self.messages()), add_special_tokens=False).ids
            ids = ids if ids[:1] == [eos] else [eos, *ids]  # a template may put BOS first itself
            if len(ids) + max_tokens <= self.engine.context or len(self.turns) <= 1:
                return ids
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]

    def reply(self, user: str, on_text: Callable[[str], None]) -> str:
        """Stream the assistant's answer to on_text; it joins the conversation."""
        self.turns.append({"role": "user", "content": user})
        max_tokens = min(self.params.max_tokens or 256, self.engine.context // 2)
        ids = self.prompt_ids(max_tokens)
        max_tokens = min(max_tokens, self.engine.context - len(ids))
        if max_tokens < 1:
            self.turns.pop()
            raise ValueError("this message alone fills the model's context: send a shorter one")
        pieces: list[str] = []
        events = self.engine.stream(ids, replace(self.params, max_tokens=max_tokens))
        try:
            for ev in events:
                if ev.error:
                    raise RuntimeError(ev.error)
                if ev.text:
                    pieces.append(ev.text)
                    on_text(ev.text)
        finally:
            events.close()  # on Ctrl-C the request is cancelled; what came so far is kept
            self.turns.append({"role": "assistant", "content": "".join(pieces).strip()})
        return "".join(pieces)

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to print, or None to quit."""
        name, _, arg = line[1:].partition(" ")
        if name in ("quit", "exit", "q"):
            return None
        if name == "reset":
            self.turns = []
            return "(conversation reset)"
        if name == "system":
            self.system, self.turns = arg.strip(), []
            return f"(system message {'set' if self.system else 'cleared'}; conversation reset)"
        if name == "set":
            key, _, value = arg.strip().partition(" ")
            if key not in SETTINGS:
                return f"unknown setting {key!r}: one of {', '.join(SETTINGS)}"
            try:
                self.params = replace(self.params, **{key: SETTINGS[key](value)})
            except ValueError:
                return f"{key} needs a {SETTINGS[key].__name__}, not {value!r}"
            return f"({key} = {getattr(self.params, key)})"
        if name == "settings":
            return "  ".join(f"{k}={getattr(self.params, k)}" for k in SETTINGS)
        return HELP


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    out.write(f"stratus chat: template {session.template.origin}; /help for commands, /quit to leave\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            said = session.command(line)
            if said is None:
                return
            out.write(said + "\n")
            continue
        out.write("model> ")
        out.flush()

        def emit(piece: str) -> None:
            out.write(piece)
            out.flush()

        try:
            session.reply(line, emit)
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except ValueError as e:
            out.write(f"({e})")
        out.write("\n")
