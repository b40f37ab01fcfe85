"""Tiny Llama / Mistral / Qwen2 / Qwen3 checkpoints (random weights, real byte-level BPE tokenizer) for the GGUF
exporter tests. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def family_config(family: str, *, vocab: int = 384, hidden: int = 64, layers: int = 2, tie: bool = False, **kw):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  max_position_embeddings=128, tie_word_embeddings=tie, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=2)
    common.update(kw)
    if family == "llama":
        return tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "qwen3":
        # transformers' GGUF loader does not read Qwen3's head size back (it keeps Qwen3Config's default, 128), so
        # the tiny model uses that head size; the exporter writes attention.key_length for llama.cpp either way.
        return tf.Qwen3Config(num_attention_heads=2, num_key_value_heads=1, head_dim=128, **common)
    raise ValueError(family)


def save_family_model(path: Path, family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      chat_template: str | None = CHAT_TEMPLATE, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    from pipelines.toy_models import save_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    cfg = family_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    # biases (Qwen2 q/k/v) and norms start at 0/1: randomise them so a wrong permutation or name would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    save_tokenizer(path, min(cfg.vocab_size, 384))
    if chat_template is not None:
        tc = json.loads((path / "tokenizer_config.json").read_text())
        tc["chat_template"] = chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return path


def save_sentencepiece_style_tokenizer(path: Path) -> int:
    """A Llama-2-style tokenizer.json (BPE with byte fallback, ``▁`` for spaces, ``<0xNN>`` byte tokens, BOS added
    by the post-processor), trained on the toy corpus. Returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pipelines.toy_models import CORPUS

    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = norm
    learner.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(path))
    return len(vocab)
