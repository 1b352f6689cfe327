"""The engine's LLM port: the types of one chat call (no I/O; services/common/llm.py's VLLMClient is the adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from services.common.errors import FleetError


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class LLMRequest:
    """One chat completion. `json_schema` (a bounded JSON Schema) asks for a machine-read answer."""

    messages: tuple[ChatMessage, ...]
    request_id: str
    temperature: float = 0.7
    seed: int | None = None
    max_tokens: int = 512
    json_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    enable_thinking: bool = False
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (not included)


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True)
class LLMResponse:
    content: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    reasoning: str | None = None
    model: str = ""
    finish_reason: str | None = None
    latency_ms: float = 0.0
    attempts: int = 1  # HTTP attempts the call took (1 = no retry)


class LLMError(FleetError):
    """The LLM server answered, but not usefully (a 4xx, an unparsable or schema-violating answer)."""
