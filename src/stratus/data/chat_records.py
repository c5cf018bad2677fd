"""Chat JSONL in the conventions users already have, read and checked line by line.

One record a line, one of:
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation (TRL's
  conversational format), roles system, user and assistant;
- `{"prompt": ..., "completion": ...}`: one exchange; either side may be a string or a
  list of messages;
- `{"prompt" | "messages": ..., "chosen": ..., "rejected": ...}`: a preference pair, each
  answer a string or a list of (assistant) messages.

A file holds conversations or preference pairs, not both. A bad line (not JSON, an unknown
role, an empty conversation, nothing for the assistant to say) raises StratusError naming
the file and line, or with skip_bad is counted and listed instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stratus.data.chat_template import ROLES
from stratus.errors import StratusError

Messages = list[dict[str, str]]
MAX_LISTED = 100


@dataclass
class Preference:
    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass
class ChatRecords:
    kind: str | None = None  # "conversations" or "preferences"
    items: list = field(default_factory=list)  # Messages, or Preference
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_count: int = 0


class BadLine(ValueError):
    pass


def _messages(value, what: str, default_role: str) -> Messages:
    """A string (one message of default_role) or a list of {role, content} objects."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise BadLine(f'"{what}" must be a string or a list of messages, not {type(value).__name__}')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadLine(f'{what}[{i}] must be an object with a string "content"')
        role = m.get("role")
        if role not in ROLES:
            raise BadLine(f"{what}[{i}] has role {role!r}: use one of {', '.join(ROLES)}")
        out.append({"role": role, "content": m["content"]})
    return out


def parse_record(obj) -> tuple[str, object]:
    """(kind, item) of one decoded line, or BadLine saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise BadLine(f"a record must be a JSON object, not {type(obj).__name__}")
    if "chosen" in obj or "rejected" in obj:
        if "chosen" not in obj or "rejected" not in obj:
            raise BadLine('a preference pair needs both "chosen" and "rejected"')
        key = "messages" if "messages" in obj else "prompt"
        if key not in obj:
            raise BadLine('a preference pair needs a "prompt" or "messages"')
        prompt = _messages(obj[key], key, "user")
        chosen = _messages(obj["chosen"], "chosen", "assistant")
        rejected = _messages(obj["rejected"], "rejected", "assistant")
        if not prompt or not chosen or not rejected:
            raise BadLine("the prompt, chosen and rejected answers must not be empty")
        return "preferences", Preference(prompt, chosen, rejected)
    if "messages" in obj:
        messages = _messages(obj["messages"], "messages", "user")
    elif "prompt" in obj and "completion" in obj:
        messages = _messages(obj["prompt"], "prompt", "user") + _messages(
            obj["completion"], "completion", "assistant"
        )
    else:
        raise BadLine('a record needs "messages", "prompt" and "completion", or "chosen" and "rejected"')
    if not messages:
        raise BadLine("the conversation is empty")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadLine("the conversation has no assistant reply: there is nothing to train on")
    return "conversations", messages


def read_records(paths: list[Path], skip_bad: bool, kind: str) -> ChatRecords:
    """Every record of kind ("conversations" or "preferences") in the files, in order."""
    out = ChatRecords(kind=kind)
    for path in paths:
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise StratusError(f"{path}: cannot be read as UTF-8 text ({e}): give JSONL files") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadLine(f"not JSON ({e.msg} at column {e.colno})") from None
                found, item = parse_record(obj)
                if found != kind:
                    other = "chat" if found == "conversations" else "preferences"
                    raise BadLine(
                        f"this is a {found[:-1]}, not a {kind[:-1]}: prepare it with --format {other}"
                    )
            except BadLine as e:
                if not skip_bad:
                    raise StratusError(
                        f"{path}:{n}: {e}; fix the line, or pass --skip-bad to skip such lines"
                    ) from None
                out.skipped_count += 1
                if len(out.skipped) < MAX_LISTED:
                    out.skipped.append({"path": str(path), "line": str(n), "reason": str(e)})
                continue
            out.items.append(item)
    return out
