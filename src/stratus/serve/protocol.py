"""Request bodies of the OpenAI API, as pydantic models: the one place where every field's
rules live, so the OpenAPI document states exactly what the server accepts. A value outside
them is a 400 that names the field.

Ranges follow OpenAI's API reference, narrowed to what the engine can represent: a seed is
a 63-bit integer, a temperature or top_p is 0 or at least a floor below which float32
arithmetic breaks down (logits / 1e-40 overflow; a top_p of 1e-300 rounds to 0), token ids
and logit_bias keys lie within the served model's vocabulary, and max_tokens within its
context. Those last limits belong to one model, so `request_models` builds the classes for
the model being served. All text must be valid Unicode: JSON can carry a lone UTF-16
surrogate ("\\ud800") that no tokenizer can encode.

A field this server does not implement (best_of, suffix, modalities, ...) is a 400 that
names it, never accepted and ignored: a client asking for something must not get something
else with a 200. `user` is accepted (an end-user id; OpenAI's is for abuse monitoring) and
not used. Of vLLM's extensions, top_k, min_p and ignore_eos are honoured. `response_format`
and a forced `tool_choice` are enforced by a grammar (inference/grammar.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, create_model

SEED_LIMIT = 2**63  # seeds lie in [0, 2**63): torch.Generator takes a signed 64-bit seed
TEMPERATURE_FLOOR = 1e-5  # below it (and above 0) logits / T can leave float32's range
TOP_P_FLOOR = 1e-6  # far above float32's smallest normal number, far below any useful nucleus
MAX_STOP = 16  # stop sequences per request
MAX_STOP_CHARS = 1024  # characters per stop sequence: each is searched for after every token
MAX_NAME_CHARS = 256  # a model name


def valid_unicode(text: str) -> str:
    """Text that UTF-8 can carry: a lone surrogate has no encoding, and would fail later in
    the tokenizer or in the JSON response."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"is not valid Unicode: a lone UTF-16 surrogate at character {e.start}; send UTF-8 text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]


def _zero_or_at_least(floor: float, top: float) -> Any:
    """A float that is 0, or in [floor, top], or absent, stated as such in the JSON schema."""

    def check(value: float | None) -> float | None:
        if value is not None and 0 < value < floor:
            raise ValueError(f"must be 0 or at least {floor:g}")
        return value

    schema = {"anyOf": [{"type": "number", "minimum": floor, "maximum": top}, {"const": 0}, {"type": "null"}]}
    return Annotated[float | None, Field(ge=0, le=top), AfterValidator(check), WithJsonSchema(schema)]


Temperature = _zero_or_at_least(TEMPERATURE_FLOOR, 2)
TopP = _zero_or_at_least(TOP_P_FLOOR, 1)
TokenBias = Annotated[float, Field(ge=-100, le=100)]


def _nonempty(item: Any) -> Any:
    return Annotated[list[item], Field(min_length=1)]


def prompt_type(token: Any) -> Any:
    """A prompt: a text, a batch of texts, token ids, or a batch of token-id lists; never
    empty at any level (there would be nothing to continue)."""
    text = Annotated[Text, Field(min_length=1)]
    return text | _nonempty(text) | _nonempty(token) | _nonempty(_nonempty(token))


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = None
    top_p: TopP = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (
        Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
        | None
    ) = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # keys are token ids written in ASCII digits; the vocabulary bound is the served model's
    logit_bias: dict[str, TokenBias] | None = None  # request_models bounds the keys by the vocabulary
    # vLLM's: -1 or 0 = off, as is a k at least the vocabulary
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0, le=1)
    ignore_eos: bool = False
    user: Annotated[Text, Field(max_length=MAX_NAME_CHARS)] | None = None  # accepted, not used


class TextPart(_Open):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class FunctionCall(_Open):
    name: FunctionName
    arguments: Text  # a JSON object as text, as the model wrote it


class ToolCall(_Open):
    id: Annotated[Text, Field(max_length=MAX_NAME_CHARS)]
    type: Literal["function"]
    function: FunctionCall


class _Message(_Open):
    content: Text | list[TextPart] | None = None
    name: Annotated[Text, Field(max_length=MAX_NAME_CHARS)] | None = None  # accepted, not rendered

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class SystemMessage(_Message):
    role: Literal["system", "developer"]


class UserMessage(_Message):
    role: Literal["user"]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None  # its earlier calls


class ToolMessage(_Message):
    role: Literal["tool"]
    tool_call_id: Annotated[Text, Field(max_length=MAX_NAME_CHARS)]  # the call it answers


# The role decides the fields, so the document states which message may carry what.
ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class FunctionDef(_Open):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # calls are always held to the schema when tool_choice forces them


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Open):
    name: FunctionName


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Open):
    name: FunctionName
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output is always held to the schema


class TextFormat(_Open):
    type: Literal["text"]


class JsonObjectFormat(_Open):
    type: Literal["json_object"]


class JsonSchemaResponse(_Open):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponse, Field(discriminator="type")]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_Sampling):
    prompt: prompt_type(int)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the server sends, in OpenAI's shape."""

    error: ErrorDetail


@dataclass(frozen=True)
class Limits:
    """What the served model can represent."""

    vocab: int  # token ids and logit_bias keys lie in [0, vocab)
    context: int  # prompt plus completion tokens
    sequences: int = 16  # sequences the server can hold at once, running and waiting


def request_models(limits: Limits) -> tuple[type[ChatCompletionRequest], type[CompletionRequest]]:
    """The request classes for one served model: the same fields, bounded by its vocabulary
    and context, so that the OpenAPI document carries the real limits."""
    token = Annotated[int, Field(ge=0, lt=limits.vocab)]
    pattern = below_pattern(limits.vocab)
    bias_key = Annotated[str, AfterValidator(_token_key(limits.vocab, pattern))]
    # the keys' rule stated for JSON-schema readers (pydantic would write patternProperties,
    # which lets other keys through)
    bias_schema = {
        "anyOf": [
            {
                "type": "object",
                "propertyNames": {"pattern": pattern},
                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            },
            {"type": "null"},
        ]
    }
    bias = Annotated[dict[bias_key, TokenBias] | None, WithJsonSchema(bias_schema)]
    length = Annotated[int | None, Field(ge=1, le=limits.context)]
    choices = Annotated[int, Field(ge=1, le=min(16, limits.sequences))]
    common = {"max_tokens": (length, None), "logit_bias": (bias, None), "n": (choices, 1)}
    chat = create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        max_completion_tokens=(length, None),
        **common,
    )
    completion = create_model(
        "CompletionRequest", __base__=CompletionRequest, prompt=(prompt_type(token), ...), **common
    )
    return chat, completion


def below_pattern(n: int) -> str:
    """A regular expression for the decimal integers 0 .. n-1, without leading zeros."""
    top = str(n - 1)
    width = len(top)
    forms = ["[0-9]"] if width > 1 else [f"[0-{top}]"]
    if width > 2:
        forms.append(f"[1-9][0-9]{{1,{width - 2}}}")
    if width > 1:
        for i, digit in enumerate(top):  # as many digits as n-1, below it from digit i on
            low, high = (1 if i == 0 else 0), int(digit) - 1
            if high >= low:
                rest = width - i - 1
                forms.append(top[:i] + f"[{low}-{high}]" + (f"[0-9]{{{rest}}}" if rest else ""))
        forms.append(top)
    return "^(" + "|".join(forms) + ")$"


def _token_key(vocab: int, pattern: str):
    ids = re.compile(pattern)

    def check(key: str) -> str:
        if not ids.fullmatch(key):  # fullmatch: `$` alone would let "1\n" through
            raise ValueError(
                f"keys are token ids of this model's vocabulary, decimal integers in [0, {vocab}); "
                f"{key!r} is not one"
            )
        return key

    return check
