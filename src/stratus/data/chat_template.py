"""The one chat contract between training and serving: the template, its special tokens,
the end-of-turn token, and which rendered tokens a chat model is trained on.

It is stored as Hugging Face stores it: `chat_template` in tokenizer_config.json beside
tokenizer.json, and the special tokens in tokenizer.json itself. `stratus prepare` writes
it into the data directory, the run copies it, the export carries it, and `serve`, `chat`
and transformers' `apply_chat_template` all render with it. Rendering uses the Jinja
settings transformers uses (sandboxed, trim_blocks, lstrip_blocks), so both give the same
text and so, through one tokenizer.json, the same tokens.

Two templates ship. A model prepared from plain text (a base model) carries TRANSCRIPT,
a plain "User: ... Assistant:" transcript that such a model can continue, with stop
strings for the next turn. Chat data is rendered with CHATML (the format of Qwen and
many others): every turn is `<|im_start|>role\\n...<|im_end|>\\n`, and the model is trained
to end its turn with `<|im_end|>`, which serving stops on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from stratus.data.tokenizer import EOS
from stratus.errors import StratusError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
CONFIG_FILE = "tokenizer_config.json"
STOP_KEY = "stratus_stop_strings"  # transformers keeps unknown keys and ignores them

# Tools and tool calls render as Hermes/Qwen's do (serve/tools.py parses the calls); a
# conversation without them renders exactly as before they existed.
CHATML = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\n\\nYou may call one or more functions. Their signatures are "
    "within <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call, write a JSON object with the function name and arguments "
    'within <tool_call></tool_call> tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- ('\\n' if (message['content'] or loop.index0) else '') + '<tool_call>\\n' }}"
    "{{- {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{- '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TRANSCRIPT = (
    "{% if tools %}{{ 'System: You may call these functions, each call a JSON object with the function name "
    "and arguments within <tool_call></tool_call> tags:\\n' }}"
    "{% for tool in tools %}{{ (tool | tojson) ~ '\\n' }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ 'System: ' }}"
    "{% elif m.role == 'assistant' %}{{ 'Assistant: ' }}"
    "{% elif m.role == 'tool' %}{{ 'Tool: ' }}"
    "{% else %}{{ 'User: ' }}{% endif %}"
    "{{ m.content or '' }}"
    "{% for call in m.tool_calls or [] %}"
    "{{ ('\\n' if (m.content or loop.index0) else '') ~ '<tool_call>\\n' }}"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "{{ '\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
TRANSCRIPT_STOP = ("\nUser:", "\nSystem:")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    """A template compiled once: compiling costs about 100 times a render, and preparing the
    chat data renders each conversation three times a reply (a server, once a request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson  # transformers' filter: Jinja's own escapes <, > and &
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja template
    end_of_turn: str  # the token that ends an assistant turn (EOS for the transcript)
    stop: tuple[str, ...]  # stop strings besides the end-of-turn token
    origin: str  # the file it came from, or "default"

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        return _compiled(self.source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=EOS,
            eos_token=EOS,
            tools=tools,
        )

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation rendered, and the character span of each assistant reply:
        its content and its end-of-turn token, what the model is trained to produce. Found
        by rendering the conversation up to each reply, so any template whose turns render
        as prefixes of the whole works."""
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            upto = self.render(messages[: i + 1], add_generation_prompt=False)
            if not full.startswith(upto) or start > len(upto):
                raise StratusError(
                    f"chat template {self.origin} does not render a conversation's turns as prefixes of "
                    "the whole, so its assistant replies cannot be found: use a template that does"
                )
            end = upto.rfind(self.end_of_turn, start)
            spans.append((start, end + len(self.end_of_turn) if end >= 0 else len(upto)))
        return full, spans

    def stop_ids(self, tok: Tokenizer) -> tuple[int, ...]:
        """The end-of-turn token's id, which ends a reply (end-of-text ends one anyway)."""
        i = tok.token_to_id(self.end_of_turn)
        return (i,) if i is not None else ()

    def encode(self, tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation, and for each whether it is trained on
        (it starts inside an assistant reply)."""
        text, spans = self.assistant_spans(messages)
        enc = tok.encode(text, add_special_tokens=False)
        mask, s = [], 0
        for start, _ in enc.offsets:
            while s < len(spans) and start >= spans[s][1]:
                s += 1
            mask.append(s < len(spans) and spans[s][0] <= start)
        return enc.ids, mask


CHAT = ChatTemplate(CHATML, IM_END, (), "default")
BASE = ChatTemplate(TRANSCRIPT, EOS, TRANSCRIPT_STOP, "default")


def add_chat_tokens(tok: Tokenizer) -> int:
    """Register CHATML's special tokens (appended after the vocabulary, so every id the
    base model knows keeps its meaning); returns how many were new."""
    return tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END)])


def write_config(directory: Path, template: ChatTemplate, max_len: int | None = None) -> None:
    """tokenizer_config.json as transformers' PreTrainedTokenizerFast reads it."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,  # stratus's tokenizer.json has no post-processor; the template adds it
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": EOS,
        # transformers and vLLM end generation on eos_token: for a chat model, its end of turn
        "eos_token": template.end_of_turn,
        "pad_token": EOS,
        "unk_token": EOS,
        "chat_template": template.source,
    }
    if max_len:
        config["model_max_length"] = max_len
    if template.stop:
        config[STOP_KEY] = list(template.stop)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_config(directory: Path) -> ChatTemplate | None:
    """The template a directory carries in its tokenizer_config.json, or None."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StratusError(f"{path} cannot be read ({e}): export or prepare it again") from None
    source = config.get("chat_template")
    if isinstance(source, list):  # transformers' named templates: take the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        return None
    eot = config.get("eos_token", EOS)
    eot = eot.get("content", EOS) if isinstance(eot, dict) else eot
    return ChatTemplate(source, eot, tuple(config.get(STOP_KEY) or ()), str(path))


def find_template(*dirs: Path | None) -> ChatTemplate:
    """The template carried by the first of dirs that has one. A model from before the
    contract, or from elsewhere without a template, is served as a base model."""
    for d in dirs:
        if d is not None and (found := read_config(d)) is not None:
            return found
    return BASE
