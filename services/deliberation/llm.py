"""The engine's LLM port: the types of one chat call and of the served model's context window (no I/O;
services/common/llm.py's VLLMClient is the adapter, services/common/tokens.py holds the real tokenizers)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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


class ContextOverflow(LLMError):
    """A prompt that does not fit the model's context window: one the engine could not fit even trimmed (it is never
    sent), or one the server refused as too long (the engine's count fell short)."""

    code = "RESOURCE_EXHAUSTED"


# --- the context window -----------------------------------------------------------------------------------------


class TokenCounter(Protocol):
    """Counts a text's tokens as the served model's tokenizer does (the chat template's own tokens aside)."""

    name: str

    def count(self, text: str) -> int: ...


class CharEstimate:
    """For a model whose tokenizer is not at hand: characters / 3, plus 10%. BPE vocabularies of 32K-150K tokens
    average ~4 characters a token on English and 3-3.5 on code, so this over-counts both (it is a margin, not a
    measure); it under-counts text with many non-Latin characters (CJK: ~1 token a character), for which the
    server's refusal is still mapped to `ContextOverflow`."""

    name = "chars/3+10%"

    def count(self, text: str) -> int:
        return math.ceil(len(text) * 11 / 30)


@dataclass(frozen=True)
class ContextWindow:
    """The served model's context window in tokens (prompt and answer together: vLLM's `max_model_len`), and how
    to count a prompt against it. `source` says where the size came from ("server": GET /v1/models, "setting":
    VLLM_CONTEXT_WINDOW)."""

    tokens: int
    counter: TokenCounter = field(default_factory=CharEstimate)
    source: str = "server"

    # The chat template's tokens, counted with a margin. Qwen's: "<|im_start|>role\n" + "<|im_end|>\n" = 5 a
    # message; the answer's priming "<|im_start|>assistant\n" and the empty think block = 7 (vLLM counted 1922
    # prompt tokens for a 1905-token system + user pair).
    PER_MESSAGE = 6
    PRIMING = 12

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(self.counter.count(m.content) + self.PER_MESSAGE for m in messages) + self.PRIMING

    def prompt_budget(self, max_tokens: int) -> int:
        """What a prompt may take when its answer may take `max_tokens`."""
        return self.tokens - max_tokens

    def describe(self) -> str:
        return f"{self.tokens:,}-token window ({self.source}, counted with {self.counter.name})"
