"""Model families the GGUF exporter supports: how a Hugging Face config becomes llama.cpp metadata, and how tensor
names map to GGUF names.

Why a table of families instead of "anything gguf can name": each family needs its own facts that a name map does
not carry (Llama/Mistral store Q/K rows permuted for GGML's RoPE, Qwen2/3 do not; Qwen3 has per-head Q/K norms and
an explicit head size), and exporting an unknown family with a guessed layout produces a file that loads and then
generates garbage. An unsupported architecture is therefore refused up front, naming the supported ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf


@dataclass(frozen=True)
class Family:
    name: str  # our name, e.g. "mistral"
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # rows of q/k stored in GGML's RoPE order (llama.cpp's LlamaModel.permute)
    default_rope_theta: float = 10000.0


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), ("llama",), gguf.MODEL_ARCH.LLAMA, True),
    # llama.cpp converts Mistral to the llama architecture (same tensors, same RoPE)
    Family("mistral", ("MistralForCausalLM",), ("mistral",), gguf.MODEL_ARCH.LLAMA, True),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), gguf.MODEL_ARCH.QWEN2, False),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), gguf.MODEL_ARCH.QWEN3, False, 1000000.0),
)


def supported_families() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.hf_architectures)})" for f in FAMILIES)


def detect_family(config: dict[str, Any]) -> Family | None:
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    for f in FAMILIES:
        if arch in f.hf_architectures:
            return f
    if arch is None:
        for f in FAMILIES:
            if config.get("model_type") in f.model_types:
                return f
    return None


@dataclass(frozen=True)
class HParams:
    """The config values llama.cpp needs, with the names and defaults the Hugging Face config classes use."""

    n_layers: int
    hidden: int
    intermediate: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_explicit: bool
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    vocab_size: int
    tie_embeddings: bool


def _rope_section(config: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """transformers ≥ 5 stores ``rope_parameters: {rope_theta, rope_type, ...}``; older configs ``rope_theta`` and
    ``rope_scaling``. Returns (theta, scaling-or-None)."""
    params = config.get("rope_parameters")
    theta = config.get("rope_theta")
    scaling = config.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if isinstance(scaling, dict):
        typ = scaling.get("rope_type", scaling.get("type", "default"))
        if typ in (None, "default"):
            scaling = None
    else:
        scaling = None
    return (float(theta) if theta is not None else None), scaling


def read_hparams(config: dict[str, Any], family: Family, where: str) -> HParams:
    """Validate and normalise the config; raises ``KeyError``-free ``ValueError`` naming the missing key."""
    def need(key: str) -> int:
        v = config.get(key)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{where}: config.json lacks a positive integer '{key}', needed for GGUF metadata")
        return v

    n_layers = need("num_hidden_layers")
    hidden = need("hidden_size")
    n_head = need("num_attention_heads")
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim")
    explicit = isinstance(head_dim, int) and head_dim > 0
    if not explicit:
        if family.name == "qwen3":
            head_dim = 128  # Qwen3Config's default
            explicit = True
        else:
            head_dim = hidden // n_head
    theta, scaling = _rope_section(config)
    return HParams(
        n_layers=n_layers, hidden=hidden, intermediate=need("intermediate_size"), n_head=n_head,
        n_head_kv=int(n_head_kv), head_dim=int(head_dim), head_dim_explicit=bool(explicit),
        context_length=int(config.get("max_position_embeddings") or 2048),
        rms_eps=float(config.get("rms_norm_eps") or 1e-6),
        rope_theta=theta if theta is not None else family.default_rope_theta, rope_scaling=scaling,
        vocab_size=need("vocab_size"), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def write_hparams(writer: gguf.GGUFWriter, hp: HParams, family: Family) -> list[str]:
    """Add the architecture key/values. Returns notes (e.g. on rope scaling)."""
    notes: list[str] = []
    writer.add_vocab_size(hp.vocab_size)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim_explicit and (family.name == "qwen3" or hp.head_dim * hp.n_head != hp.hidden):
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    sc = hp.rope_scaling
    if sc is not None:
        typ = sc.get("rope_type", sc.get("type"))
        if typ == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(sc["factor"]))
        elif typ == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(sc["factor"]))
            if sc.get("original_max_position_embeddings"):
                writer.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
        elif typ == "llama3":
            notes.append("rope: llama3 scaling stored as the rope_freqs.weight tensor (as llama.cpp does)")
        else:  # checked in check_rope_scaling
            raise AssertionError(typ)
    return notes


SUPPORTED_ROPE_SCALING = ("linear", "yarn", "llama3")


def check_rope_scaling(hp: HParams, where: str) -> None:
    if hp.rope_scaling is not None:
        typ = hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type"))
        if typ not in SUPPORTED_ROPE_SCALING:
            raise ValueError(f"{where}: rope scaling type '{typ}' cannot be exported to GGUF (supported: none, "
                             f"{', '.join(SUPPORTED_ROPE_SCALING)})")


def llama3_rope_factors(hp: HParams):
    """The per-frequency divisors llama.cpp applies for Llama 3.1-style rope scaling (``rope_freqs.weight``):
    1 for high frequencies, ``factor`` for low ones, a smooth blend between (Llama 3.1's published formula)."""
    import numpy as np

    sc = hp.rope_scaling or {}
    factor = float(sc.get("factor", 8.0))
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    dim = hp.head_dim
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# Hugging Face tensors that carry no weights llama.cpp needs
SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def gguf_tensor_name(family: Family, n_layers: int, hf_name: str, name_map=None) -> str | None:
    """GGUF name of a Hugging Face tensor, or None if this family has no such tensor."""
    name_map = name_map or gguf.get_tensor_name_map(family.arch, n_layers)
    found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        return None
    ttype, new_name = found
    if ttype not in gguf.MODEL_TENSORS[family.arch]:
        return None
    return new_name


def qk_heads(gguf_name: str, hp: HParams) -> int | None:
    """Number of heads whose rows must be RoPE-permuted in this tensor (None: no permutation)."""
    if ".attn_q." in gguf_name:
        return hp.n_head
    if ".attn_k." in gguf_name:
        return hp.n_head_kv
    return None
