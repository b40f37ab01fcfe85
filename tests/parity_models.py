"""Tiny Llama checkpoints built from numpy's seeded generator, for the MergeKit parity check.

Why not ``transformers``' random init: the MergeKit outputs stored under ``tests/data/mergekit_golden`` were made
from these exact bytes, so the inputs must be reproducible on any machine and any library version. numpy's
``default_rng`` stream is stable across versions; bf16 rounding is done by torch (round to nearest even), which is
also fixed. ``input_fingerprint()`` lets the test fail clearly if the inputs ever change.

Models: a base, three fine-tunes (base + a dense small delta, some entries of one fine-tune left equal to the base so
sparsified deltas and zero deltas occur), and a PEFT-format LoRA adapter (written directly: the file layout PEFT
saves, ``init_lora_weights=False``-style random A and B).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN = 32
INTER = 64
VOCAB = 64
HEADS = 4
KV_HEADS = 2
LAYERS = 4


def llama_config_dict(dtype: str) -> dict:
    head_dim = HIDDEN // HEADS
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": head_dim, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
        "initializer_range": 0.02,
    }


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    kv = KV_HEADS * (HIDDEN // HEADS)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                                          "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    return shapes


_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _write(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(_TORCH[dtype])
               for k, v in sorted(tensors.items())}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(llama_config_dict(dtype), indent=2, sort_keys=True))
    return path


def _base_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in tensor_shapes().items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            out[name] = 0.05 * rng.standard_normal(shape)
    return out


def build_family(root: Path, dtype: str = "bfloat16") -> dict[str, Path]:
    """base, ft1..ft3 and a LoRA adapter ``lora`` under ``root`` (idempotent: rebuilds only missing models)."""
    root = Path(root)
    rng = np.random.default_rng(20261126)
    base = _base_arrays(rng)
    paths = {"base": _write(root / "base", base, dtype)}
    for i, (scale, keep) in enumerate([(0.02, 1.0), (0.03, 1.0), (0.02, 0.6)], start=1):
        ft = {}
        for name, w in base.items():
            d = scale * rng.standard_normal(w.shape)
            if keep < 1.0:  # some entries unchanged: exact zero deltas
                d = d * (rng.random(w.shape) < keep)
            ft[name] = w + d
        paths[f"ft{i}"] = _write(root / f"ft{i}", ft, dtype)
    paths["lora"] = _write_lora(root / "lora", rng, dtype)
    return paths


def _write_lora(path: Path, rng: np.random.Generator, dtype: str, r: int = 4, alpha: int = 8) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes()
    tensors = {}
    for i in range(LAYERS):
        for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            out_f, in_f = shapes[f"model.layers.{i}.{mod}.weight"]
            key = f"base_model.model.model.layers.{i}.{mod}"
            tensors[f"{key}.lora_A.weight"] = 0.1 * rng.standard_normal((r, in_f))
            tensors[f"{key}.lora_B.weight"] = 0.1 * rng.standard_normal((out_f, r))
    save_file({k: torch.from_numpy(v.astype(np.float32)).to(_TORCH[dtype]) for k, v in sorted(tensors.items())},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": ["q_proj", "v_proj", "down_proj"], "bias": "none", "fan_in_fan_out": False,
           "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
           "base_model_name_or_path": None, "inference_mode": True, "init_lora_weights": True}
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path


def input_fingerprint(paths: dict[str, Path]) -> str:
    """sha256 over every input file's bytes, in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(paths):
        for f in sorted(Path(paths[name]).iterdir()):
            h.update(f"{name}/{f.name}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()
