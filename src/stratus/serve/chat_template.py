"""Chat messages -> prompt text.

A base model (what `stratus train` makes from a plain corpus) has never seen a chat, so
stratus renders one as a plain transcript that such a model can continue:

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\nUser: {user}\\n\\nAssistant:

and stops the reply where the model starts the next turn ("\\nUser:" or "\\nSystem:"). A model
trained on chat data carries its own template: a Jinja file `chat_template.jinja` (the name
transformers uses) in the run, checkpoint or export directory, rendered with `messages`,
`add_generation_prompt=True`, `bos_token` and `eos_token`, as transformers does; its stop
strings, if any, go one per line in `chat_stop.txt` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from stratus.data.tokenizer import EOS

DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ 'System: ' }}"
    "{% elif m.role == 'assistant' %}{{ 'Assistant: ' }}"
    "{% else %}{{ 'User: ' }}{% endif %}"
    "{{ m.content ~ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
DEFAULT_STOP = ("\nUser:", "\nSystem:")
FILE, STOP_FILE = "chat_template.jinja", "chat_stop.txt"


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    stop: tuple[str, ...]
    origin: str  # "default" or the file it came from

    def render(self, messages: list[dict[str, str]]) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.source).render(
            messages=messages, add_generation_prompt=True, bos_token=EOS, eos_token=EOS
        )


def find_template(*dirs: Path | None) -> ChatTemplate:
    """The template carried by the first of dirs that has one, or the default."""
    for d in dirs:
        if d is not None and (d / FILE).is_file():
            stop_file = d / STOP_FILE
            lines = stop_file.read_text().splitlines() if stop_file.is_file() else []
            stop = tuple(s.encode().decode("unicode_escape") for s in lines if s)
            return ChatTemplate((d / FILE).read_text(), stop, str(d / FILE))
    return ChatTemplate(DEFAULT_TEMPLATE, DEFAULT_STOP, "default")
