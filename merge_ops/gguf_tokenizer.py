"""Tokenizer metadata for a GGUF file, read from a Hugging Face model directory's ``tokenizer.json``.

Why from ``tokenizer.json`` and not from a loaded ``transformers`` tokenizer: the exporter must not need
transformers, and ``tokenizer.json`` holds everything llama.cpp stores (vocabulary, merges, added tokens and their
kind); the special tokens and chat template come from ``tokenizer_config.json`` / ``special_tokens_map.json`` /
``chat_template.jinja``. Whether the tokenizer adds BOS/EOS is *measured* by encoding a probe string with the
``tokenizers`` library (the post-processor decides it, not a flag), so the GGUF's ``add_bos_token`` says what the
source tokenizer really does.

Supported: byte-level BPE vocabularies (GPT-2 / Llama 3 / Qwen2 style, ``tokenizer.ggml.model = gpt2``) and
SentencePiece-style BPE with byte fallback (Llama 2 / Mistral style, ``tokenizer.ggml.model = llama``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Token kinds as llama.cpp numbers them (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of well-known byte-level BPE pre-tokenizers -> llama.cpp's pre-tokenizer name. llama.cpp identifies
# these by hashing a probe tokenization; comparing the regex itself is exact for tokenizers that use one of them.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLITS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

_SPECIALS = ("bos", "eos", "unk", "pad")


class TokenizerExportError(ValueError):
    """Raised (wrapped by the exporter into its own error class) when the tokenizer cannot be represented."""


@dataclass
class GgufTokenizer:
    """Everything the GGUF ``tokenizer.*`` keys hold."""

    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None
    notes: list[str] = field(default_factory=list)

    def write(self, writer) -> None:
        """Add the ``tokenizer.*`` key/values to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
                  "pad": writer.add_pad_token_id}
        for kind, tid in self.special_ids.items():
            adders[kind](tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerExportError(f"{path}: cannot read ({e})") from e


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template(model_dir: Path, tok_cfg: dict) -> str | list[dict[str, str]] | None:
    """The chat template: ``chat_template.jinja`` wins (what transformers ≥ 4.43 writes), then
    ``chat_template.json``, then ``tokenizer_config.json``. Named templates become GGUF's list form."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = None
    cj = model_dir / "chat_template.json"
    if cj.is_file():
        tpl = _load_json(cj).get("chat_template")
    if tpl is None:
        tpl = tok_cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}]
        named = [t for t in tpl if isinstance(t, dict) and "name" in t and "template" in t]
        return named or None
    return tpl if isinstance(tpl, str) and tpl else None


def _probe_add_special(tokenizer_json: Path, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Does encoding add BOS at the start / EOS at the end? Measured with the ``tokenizers`` library."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    probe = "hello world"
    plain = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    bos, eos = special_ids.get("bos"), special_ids.get("eos")
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and (not plain or plain[0] != bos)
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and (not plain or plain[-1] != eos)
    return add_bos, add_eos


def _pre_tokenizer_name(pre: Any, notes: list[str]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``pre_tokenizer`` section of tokenizer.json."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            notes.append("tokenizer: the ByteLevel pre-tokenizer adds a prefix space, which GGUF's gpt2 tokenizer "
                         "does not; ids of text not starting with a space will differ")
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        splits = [s for s in steps if s.get("type") == "Split"]
        byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
        if len(splits) == 1 and len(byte_level) == 1 and not byte_level[0].get("use_regex", True):
            regex = (splits[0].get("pattern") or {}).get("Regex")
            if regex in KNOWN_SPLITS:
                return KNOWN_SPLITS[regex]
    notes.append("tokenizer: pre-tokenizer not recognised (not GPT-2, Llama 3 or Qwen2 style); written as 'default', "
                 "so llama.cpp may split text differently from the source tokenizer")
    return "default"


def read_tokenizer(model_dir: str | Path, vocab_size: int, config: dict[str, Any] | None = None) -> GgufTokenizer:
    """Build the GGUF tokenizer description of ``model_dir``. ``vocab_size`` is the model's embedding row count:
    the token list is padded with ``[PAD<i>]`` (UNUSED) entries up to it, as llama.cpp's converter does."""
    model_dir = Path(model_dir)
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        present = [p.name for p in model_dir.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges"))]
        raise TokenizerExportError(
            f"{model_dir}: no tokenizer.json (found: {', '.join(present) or 'no tokenizer files'}). GGUF export needs "
            f"the fast tokenizer file; save it with AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
    data = _load_json(tj)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerExportError(f"{tj}: tokenizer model '{model.get('type')}' is not supported for GGUF export "
                                   f"(supported: BPE, byte-level or SentencePiece-style with byte fallback)")
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = _load_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    stm_path = model_dir / "special_tokens_map.json"
    stm = _load_json(stm_path) if stm_path.is_file() else {}

    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in data.get("added_tokens") or []}
    for content, a in added.items():
        vocab[content] = int(a["id"])
    by_id: dict[int, str] = {}
    for text, tid in vocab.items():
        by_id[int(tid)] = text
    n_tok = max(by_id) + 1 if by_id else 0
    notes: list[str] = []
    if n_tok > vocab_size:
        raise TokenizerExportError(f"{tj}: the tokenizer has {n_tok} tokens but the model's embedding has only "
                                   f"{vocab_size} rows")

    byte_fallback = bool(model.get("byte_fallback"))
    kind = "llama" if byte_fallback else "gpt2"
    tokens: list[str] = []
    types: list[int] = []
    unk_text = model.get("unk_token")
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(text)
        if text in added:
            types.append(CONTROL if added[text].get("special") else USER_DEFINED)
            if kind == "llama" and text == unk_text:
                types[-1] = UNKNOWN
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
        elif kind == "llama" and text == unk_text:
            types.append(UNKNOWN)
        else:
            types.append(NORMAL)
    if n_tok < vocab_size:
        notes.append(f"tokenizer: {vocab_size - n_tok} unused ids padded as [PAD<i>] up to the embedding size")

    merges_raw = model.get("merges") or []
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else str(m) for m in merges_raw]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise TokenizerExportError(f"{tj}: a BPE merge contains a space inside a token, which GGUF's 'a b' merge "
                                   f"format cannot represent")

    special_ids: dict[str, int] = {}
    for kind_name in _SPECIALS:
        key = f"{kind_name}_token"
        text = _token_text(tok_cfg.get(key)) or _token_text(stm.get(key))
        if text is not None and text in vocab:
            special_ids[kind_name] = int(vocab[text])
        elif text is not None:
            notes.append(f"tokenizer: {key} '{text}' is not in the vocabulary; not written")
        elif config and isinstance(config.get(f"{kind_name}_token_id"), int):
            special_ids[kind_name] = int(config[f"{kind_name}_token_id"])

    add_bos, add_eos = _probe_add_special(tj, special_ids)
    scores = None
    add_space_prefix = None
    pre: str | None
    if kind == "gpt2":
        pre = _pre_tokenizer_name(data.get("pre_tokenizer"), notes)
    else:
        pre = "default"
        # SentencePiece BPE: llama.cpp ranks merges by token score; a token's rank is its id (vocab order follows
        # merge order in SentencePiece-trained vocabularies), so score = -id keeps that order.
        scores = [-float(i) if t != UNUSED else -1e9 for i, t in enumerate(types)]
        normalizer = json.dumps(data.get("normalizer"))
        pre_tok = json.dumps(data.get("pre_tokenizer"))
        add_space_prefix = '"Prepend"' in normalizer or '"prepend_scheme": "always"' in pre_tok \
            or '"prepend_scheme": "first"' in pre_tok
    return GgufTokenizer(model=kind, pre=pre, tokens=tokens, token_types=types, merges=merges, scores=scores,
                         special_ids=special_ids, add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                         chat_template=_chat_template(model_dir, tok_cfg), notes=notes)
