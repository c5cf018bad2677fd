"""Tool calls in the format stratus's chat templates teach (Hermes/Qwen's, which vLLM's
`hermes` parser reads): each call is

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

The template renders the tools and earlier calls (data/chat_template.py). Here:
- `grammar`: with tool_choice "required" or a named function, the output is constrained to
  calls of the allowed functions, their arguments valid against each one's parameters;
- `ToolParser`: turns the model's text into OpenAI's `content` and `tool_calls`, as one
  message or as stream deltas. Text before the first call is content; a block that is not
  a valid call of a known function stays content (the model wrote text, not a call).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from stratus.inference import grammar as g

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
TAG = "<tool_call>"


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def grammar(tools: list[dict[str, Any]], choice: str | dict, parallel: bool) -> str | None:
    """The grammar that forces tool calls, or None where the model chooses (auto, none)."""
    if isinstance(choice, dict):
        fns = [t["function"] for t in tools if t["function"]["name"] == choice["function"]["name"]]
    elif choice == "required":
        fns = [t["function"] for t in tools]
    else:
        return None
    schema = _call_schema(fns[0]) if len(fns) == 1 else {"anyOf": [_call_schema(f) for f in fns]}
    lines = [
        "start: call" + (' ("\\n" call)*' if parallel else ""),
        f"call: {json.dumps(OPEN)} body {json.dumps(CLOSE)}",
        "body: " + g.json_in_lark(schema),
    ]
    return g.lark("\n".join(lines))


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolParser:
    """The model's text, fed in pieces, as OpenAI deltas: {"content": ...} or
    {"tool_calls": [...]}. `calls` holds the complete calls so far."""

    def __init__(self, names: set[str]):
        self.names = names
        self.buf = ""  # text not yet sent: a possible start of a tag, or a call's body
        self.inside = False
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        out: list[dict[str, Any]] = []
        while True:
            if not self.inside:
                at = self.buf.find(TAG)
                if at < 0:
                    # hold back a tail that may be the start of a tag still arriving
                    keep = next((k for k in range(len(TAG) - 1, 0, -1) if self.buf.endswith(TAG[:k])), 0)
                    self._content(out, self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out
                self._content(out, self.buf[:at])
                self.buf, self.inside = self.buf[at:], True
            end = self.buf.find(CLOSE)
            if end < 0:
                return out
            block, self.buf = self.buf[: end + len(CLOSE)], self.buf[end + len(CLOSE) :]
            self.inside = False
            call = self._parse(block)
            if call is None:
                self._content(out, block)
                continue
            if self.buf.startswith("\n"):  # the separator between parallel calls
                self.buf = self.buf[1:]
            out += self._call_deltas(call)

    def flush(self) -> list[dict[str, Any]]:
        """The end of the output: what is held back was text after all."""
        out: list[dict[str, Any]] = []
        self._content(out, self.buf)
        self.buf = ""
        return out

    def _content(self, out: list[dict[str, Any]], text: str) -> None:
        if text and not (self.calls and not text.strip()):  # whitespace after calls is not a message
            out.append({"content": text})

    def _parse(self, block: str) -> dict[str, Any] | None:
        body = block[len(TAG) : -len(CLOSE)].strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in self.names:
            return None
        args = call.get("arguments", {})
        return {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}

    def _call_deltas(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        """OpenAI's shape: the first delta of a call carries its id, type and name; the
        arguments follow (here whole, once the call is complete: the grammar or the closing
        tag says so)."""
        index = len(self.calls)
        full = {"id": _new_id(), "type": "function", "function": dict(call)}
        self.calls.append(full)
        head = {
            "index": index,
            "id": full["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        args = {"index": index, "function": {"arguments": call["arguments"]}}
        return [{"tool_calls": [head]}, {"tool_calls": [args]}]


def parse(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole output: (content or None, tool calls)."""
    p = ToolParser(names)
    deltas = p.feed(text) + p.flush()
    content = "".join(d.get("content", "") for d in deltas)
    return (content or None) if p.calls else content, p.calls
