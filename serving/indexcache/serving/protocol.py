"""What crosses the app's two boundaries.

1. Client -> ingress: the OpenAI request bodies we honour. `parse_body(raw, model)` turns the raw bytes of a
   request into a validated body or a `BadRequest` naming the field: invalid UTF-8, invalid JSON, NaN,
   lone UTF-16 surrogates, wrong types (strict: `"stream": 0`, `"n": true`, `"prompt": [true]` are
   refused, never coerced), values out of range, roles outside system/user/assistant/developer/tool,
   and features this server does not implement (`tools`, `response_format`, penalties, ...), which are
   refused instead of silently ignored. Unknown fields are ignored, as OpenAI-compatible servers do.
2. Ingress -> server (a Ray Serve call between processes): typed messages, as vLLM's
   EngineCoreRequest/EngineCoreOutput. The ingress sends one `GenerateRequest`; the server's stream
   answers with a head, either `StreamHead` (accepted: prompt size and the pattern it runs on) or
   `RequestRefused` (bad input, so the ingress can answer with a proper 4xx before any byte of a stream
   is sent), then `TextDelta`s until one carries a `finish_reason`. A failure after the head ends with
   a delta whose finish_reason is "error" (and an `error` message); the ingress turns it into an SSE
   error event, or a 500 when not streaming.
"""

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# "stop": an EOS token or a stop string; "length": max_tokens or the context; "abort": cancelled;
# "error": generation failed inside the server
FinishReason = Literal["stop", "length", "abort", "error"]

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_LOGPROBS = 20          # top alternatives per token (OpenAI's chat limit; vLLM's default)
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 64 - 1   # what torch.Generator.manual_seed takes
MAX_BODY_BYTES = 16 * 2 ** 20


# ---------------------------------------------------------------------------------------------------
# client -> ingress: parsing and validating OpenAI request bodies
# ---------------------------------------------------------------------------------------------------
class BadRequest(Exception):
    """A request the client must fix: HTTP 400 with `param` naming the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def _path(loc) -> str:
    """('messages', 0, 'content') -> 'messages[0].content' (the `param` of an error)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            out += ("." if out else "") + str(part)
        # anything else is pydantic's tag for a union branch or validator, not a field
    return out


def _no_surrogates(body: Any) -> None:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python then holds a str no tokenizer or UTF-8
    encoder accepts. Refuse it here, naming where it is. Iterative: bodies nest as deep as json allows."""
    todo = [(body, ())]
    while todo:
        value, loc = todo.pop()
        if isinstance(value, str):
            for i, ch in enumerate(value):
                if "\ud800" <= ch <= "\udfff":
                    where = _path(loc) or "body"
                    raise BadRequest(f"{where}: contains a lone UTF-16 surrogate (\\u{ord(ch):04x} at character {i}), "
                                     "which is not valid Unicode text; send well-formed UTF-8", param=where)
        elif isinstance(value, dict):
            todo.extend((k, loc) for k in value)
            todo.extend((v, loc + (k,)) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((v, loc + (i,)) for i, v in enumerate(value))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} does not fit a 64-bit float")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON; send a number")


def load_json(raw: bytes) -> dict:
    """Request bytes -> the JSON object, or BadRequest saying what is wrong with the bytes."""
    if not raw.strip():
        raise BadRequest("the request body is empty: send a JSON object", param="body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {exc.start}): send UTF-8 JSON",
                         param="body") from None
    try:
        obj = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                         param="body") from None
    except (ValueError, RecursionError) as exc:   # NaN/Infinity, 1e999, ints of thousands of digits, deep nesting
        msg = "nested too deeply" if isinstance(exc, RecursionError) else (
            "a number has too many digits" if "digits" in str(exc) else str(exc))
        raise BadRequest(f"the request body is not valid JSON: {msg}", param="body") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(obj).__name__ if obj is not None else 'null'}",
                         param="body")
    _no_surrogates(obj)
    return obj


def parse_body(raw: bytes, model: type["_Body"]) -> "_Body":
    """Raw request bytes -> the validated body, or BadRequest naming the field."""
    obj = load_json(raw)
    _check_unsupported(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = _path(err.get("loc", ())) or "body"
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        code = "unsupported_parameter" if "not supported" in msg else None
        raise BadRequest(f"{where}: {msg}", param=where, code=code) from None


# Fields of the OpenAI API this server does not implement: refused when set to anything but their
# default (ignoring them would answer something else than what was asked).
_UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "response_format": "structured output (response_format)", "logit_bias": "logit_bias",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "best_of": "best_of", "echo": "echo", "suffix": "suffix", "audio": "audio output", "modalities": "modalities",
    "prediction": "predicted outputs", "web_search_options": "web search",
}
_DEFAULTS_OK = {"tools": ([],), "tool_choice": ("none",), "functions": ([],), "parallel_tool_calls": (True, False),
                "response_format": ({"type": "text"},), "logit_bias": ({},), "presence_penalty": (0, 0.0),
                "frequency_penalty": (0, 0.0), "best_of": (1,), "echo": (False,), "suffix": ("",),
                "modalities": (["text"],)}


def _check_unsupported(body: dict) -> None:
    for name, what in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or any(value == ok and type(value) is type(ok) for ok in _DEFAULTS_OK.get(name, ())):
            continue
        raise BadRequest(f"{name}: {what} is not supported by this server; leave {name} out", param=name,
                         code="unsupported_parameter")


class _Strict(BaseModel):
    # strict: no coercion ("stream": 0, "n": true, "max_tokens": "8" and "prompt": [true] are refused)
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Body(_Strict):
    """Fields both routes take. null means "the default", as in OpenAI's API."""
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Any = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of up to 4 strings")
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("takes up to 4 non-empty strings")
        return stops

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    def _sampling(self) -> dict:
        return dict(temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=tuple(self.stop or ()))


class CompletionRequest(_Body):
    prompt: Any
    max_tokens: int | None = Field(None, ge=0)
    # the number of most likely alternatives to return per token (0: only the chosen token's logprob)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]   # a batch of one prompt: OpenAI's list form
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        raise ValueError("must be a string or a list of token ids (integers); one prompt per request")

    def to_generate_request(self) -> "GenerateRequest":
        return GenerateRequest(max_tokens=16 if self.max_tokens is None else self.max_tokens,
                               prompt=self.prompt, logprobs=self.logprobs, **self._sampling())


class ChatMessage(_Strict):
    role: Literal[ROLES]
    content: Any
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Any = None

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, v):
        if v not in (None, []):
            raise ValueError("tool calling is not supported by this server; send no tool_calls")
        return None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            # OpenAI's content parts: text only here, joined with newlines as vLLM does
            for j, part in enumerate(v):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"part {j} must be an object with a 'type'")
                if part["type"] != "text":
                    raise ValueError(f"part {j} is of type {part['type']!r}, which is not supported; "
                                     "only 'text' parts are")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {j} needs 'text': a string")
            return "\n".join(part["text"] for part in v)
        raise ValueError('must be a string or a list of text parts ({"type": "text", "text": "..."})')

    def rendered(self) -> dict[str, str]:
        """What the chat template sees: developer messages are system messages (OpenAI's renaming)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return v

    def to_generate_request(self, max_model_len: int) -> "GenerateRequest":
        """Without a limit a chat reply may run to the end of the context (max_model_len)."""
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return GenerateRequest(max_tokens=max_model_len if limit is None else limit,
                               messages=[m.rendered() for m in self.messages],
                               logprobs=(self.top_logprobs or 0) if self.logprobs else None, **self._sampling())


# ---------------------------------------------------------------------------------------------------
# ingress -> server
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a text or token-id prompt, or chat messages (the server applies the chat template).
    logprobs: None (off) or how many top alternatives to return per token (0: the chosen token's only)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a GenerateRequest takes exactly one of prompt or messages")

    @property
    def input_field(self) -> str:
        """The request field an input error names."""
        return "messages" if self.messages is not None else "prompt"


@dataclass(frozen=True)
class StreamHead:
    """First message of an accepted request."""
    prompt_tokens: int
    pattern: str
    pattern_version: int


@dataclass(frozen=True)
class RequestRefused:
    """First and only message of a refused request: the HTTP status and the field to name."""
    message: str
    status: int
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability under the model (raw logits, before temperature and
    top-p, as vLLM reports them) and the most likely alternatives at its position, best first."""
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """Text to stream now; the last one carries the finish reason. `logprobs`: one entry per token added
    since the previous delta (when the request asked for them)."""
    text: str
    finish_reason: FinishReason | None
    completion_tokens: int            # tokens generated so far
    error: str | None = field(default=None)
    logprobs: tuple[TokenLogprob, ...] | None = None
