"""Tiny, locally generated Llama checkpoints and tokenizers for the demo and the tests (nothing is downloaded).

Why a trained tokenizer instead of a fixture file: the tests must run on a fresh clone with no hub access, and a
real ``tokenizers`` BPE model exercises the same file formats (tokenizer.json, tokenizer_config.json) users have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merge models with lora adapters and task arithmetic",
    "one two three four five six seven eight nine ten",
    "def add(a, b): return a + b",
    "question: what is two plus two? answer: four",
]


def save_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """Train a byte-level BPE tokenizer on a fixed corpus and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:max(0, vocab_size - 64)],
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def llama_config(num_layers: int = 2, hidden: int = 32, vocab: int = 128, tie: bool = False, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, **kw,
    )


def save_tiny_llama(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2,
                    hidden: int = 32, vocab: int = 128, tie: bool = False, tokenizer: bool = True,
                    max_shard_size: str | None = None) -> Path:
    """A randomly initialised LlamaForCausalLM saved with ``save_pretrained`` (safetensors)."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(num_layers, hidden, vocab, tie)).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    if tokenizer:
        save_tokenizer(path, vocab)
    return path


def save_variant(base: Path, out: Path, *, seed: int, scale: float = 0.05, dtype: torch.dtype | None = None,
                 drop: tuple[str, ...] = ()) -> Path:
    """A "fine-tune" of ``base``: every float tensor plus seeded noise of relative size ``scale``.

    ``drop`` removes tensors, to test inputs where a tensor exists in only some models.
    """
    from safetensors.torch import load_file, save_file
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for f in sorted(base.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    new = {}
    for k, v in sd.items():
        if k in drop:
            continue
        v32 = v.float()
        noise = torch.randn(v.shape, generator=g) * (v32.abs().mean() + 1e-3) * scale
        new[k] = (v32 + noise).to(dtype or v.dtype).contiguous()
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    if dtype is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).replace("torch.", "")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (test helper only: tests are allowed to load tiny models whole)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update({k: v.clone() for k, v in load_file(str(f)).items()})
    return sd


def save_lora_adapter(base: Path, out: Path, *, seed: int = 0, r: int = 8, alpha: int = 16,
                      targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"), **lora_kw) -> Path:
    """A real PEFT LoRA adapter for ``base`` with non-zero random A and B (``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **lora_kw)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    return Path(out)
