"""What crosses the app's two boundaries.

1. Client -> ingress: the OpenAI request bodies we honour (pydantic; unknown fields are ignored, as
   OpenAI-compatible servers do).
2. Ingress -> server (a Ray Serve call between processes): typed messages, as vLLM's
   EngineCoreRequest/EngineCoreOutput. The ingress sends one `GenerateRequest`; the server's stream
   answers with a head, either `StreamHead` (accepted: prompt size and the pattern it runs on) or
   `RequestRefused` (bad input, so the ingress can answer with a proper 4xx before any byte of a stream
   is sent), then `TextDelta`s until one carries a `finish_reason`. A failure after the head ends with
   a delta whose finish_reason is "error" (and an `error` message); the ingress turns it into an SSE
   error event, or a 500 when not streaming.
"""

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# "stop": an EOS token or a stop string; "length": max_tokens or the context; "abort": cancelled;
# "error": generation failed inside the server
FinishReason = Literal["stop", "length", "abort", "error"]


# ---------------------------------------------------------------------------------------------------
# client -> ingress: OpenAI request bodies
# ---------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Body):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=0)

    def to_generate_request(self) -> "GenerateRequest":
        return GenerateRequest(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                               seed=self.seed, stop=tuple(self.stop or ()), prompt=self.prompt)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)

    def to_generate_request(self, max_model_len: int) -> "GenerateRequest":
        """Without a limit a chat reply may run to the end of the context (max_model_len)."""
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return GenerateRequest(max_tokens=max_model_len if limit is None else limit, temperature=self.temperature,
                               top_p=self.top_p, seed=self.seed, stop=tuple(self.stop or ()),
                               messages=[m.model_dump() for m in self.messages])


# ---------------------------------------------------------------------------------------------------
# ingress -> server
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a text or token-id prompt, or chat messages (the server applies the chat template)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None

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
class TextDelta:
    """Text to stream now; the last one carries the finish reason."""
    text: str
    finish_reason: FinishReason | None
    completion_tokens: int            # tokens generated so far
    error: str | None = field(default=None)
