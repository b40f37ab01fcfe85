"""GGUF export round trips: real GGUF files read back with ``gguf.GGUFReader`` and loaded with transformers'
``gguf_file=`` loader, compared with the source model.

Oracles:
- F32: the loaded model's logits equal the source model's (≤ 1e-4).
- Every other type: the loaded model's logits equal those of the *source model with each weight replaced by its
  quantize→dequantize image* (``gguf.quants`` round trip, same per-tensor type rules) to ≤ 1e-4 — this proves names,
  RoPE permutation, type choice and byte layout exactly; the loss the type itself costs is then measured against the
  source (relative logit error, top-1 agreement) and must stay within stated bounds.
- The quantizer itself is checked against per-block error bounds derived from each format's definition.
- Tokenizer: ids of the source HF tokenizer and the tokenizer transformers rebuilds from the GGUF are identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from merge_ops.gguf_export import GgufExportError, export_gguf
from tests.gguf_models import CHAT_TEMPLATE, save_family_model


BASE = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
QT = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}
LOW_BIT = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
# Measured on these tiny models (2 layers, hidden 64, init std 0.2 -- a strong amplifier of weight error; real
# models lose far less): relative logit error ‖Δ‖/‖logits‖ and top-1 agreement, 4×24 tokens, all four families:
#   f16 ≤ 0.0013 / ≥ 0.99   bf16 ≤ 0.012 / ≥ 0.97   q8_0 ≤ 0.035 / ≥ 0.95   q5_0 ≤ 0.27 / ≥ 0.63
#   q5_1 ≤ 0.24 / ≥ 0.66     q4_0 ≤ 0.49 / ≥ 0.30    q4_1 ≤ 0.47 / ≥ 0.33
# Bounds below leave ~1.5× headroom on the error and a margin on agreement.
QUALITY = {"f16": (0.003, 0.97), "bf16": (0.02, 0.93), "q8_0": (0.06, 0.90), "q5_0": (0.4, 0.5),
           "q5_1": (0.4, 0.5), "q4_0": (0.7, 0.2), "q4_1": (0.7, 0.2)}
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b",
         "  two  spaces\n\nand new lines 12345", "<s>question: what is two plus two?</s>", "Ünïcödé ✓ 東京"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-src")
    # Qwen2 with tied embeddings (no lm_head / output.weight); directory names are not bare family names because
    # transformers' loader treats general.name == "mistral" specially and then fails.
    return {f: save_family_model(root / f"tiny-{f}", f, seed=i, tie=(f == "qwen2")) for i, f in enumerate(FAMILIES)}


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def _fake_quant(model, quant: str):
    """The source model with every 2-D weight replaced by its quantize→dequantize image (exporter's type rules)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(model.config)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim < 2:
                continue
            t = QT[quant]
            if name == "lm_head.weight" and t in LOW_BIT:
                t = T.Q8_0
            if t == T.F16:
                p.copy_(p.half().float())
            elif t == T.BF16:
                p.copy_(p.bfloat16().float())
            else:
                p.copy_(torch.from_numpy(gq.dequantize(gq.quantize(p.detach().numpy().astype(np.float32), t), t)))
    return m


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_round_trip_every_base_type(models, family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = models[family]
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(ids).logits
    table = []
    for quant in BASE:
        out = tmp_path / f"{family}-{quant}.gguf"
        res = export_gguf(src, out, quant)
        loaded = _load_gguf(out)
        assert type(loaded).__name__ == ("LlamaForCausalLM" if family == "mistral" else type(ref).__name__)
        with torch.no_grad():
            b = loaded(ids).logits
        if quant == "f32":
            assert (a - b).abs().max().item() <= 1e-4
            continue
        with torch.no_grad():
            oracle = _fake_quant(ref, quant)(ids).logits
        assert (oracle - b).abs().max().item() <= 1e-4, f"{family} {quant}: GGUF differs from its quantized source"
        rel = ((a - b).norm() / a.norm()).item()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        table.append(f"{quant}: rel {rel:.4f} top1 {top1:.3f} ratio {res.compression_ratio:.2f}")
        max_rel, min_top1 = QUALITY[quant]
        assert rel <= max_rel and top1 >= min_top1, (family, quant, rel, top1)
        assert rel > 0  # the type really quantized something
    print(f"\n{family}: " + "; ".join(table))


def test_quantizer_respects_per_block_error_bounds(models, tmp_path):
    """Each stored tensor, dequantized from the file, is within the format's own error bound of the source."""
    from safetensors.torch import load_file

    src = models["qwen2"]  # no Q/K permutation: stored rows line up with the source rows
    sd = load_file(str(src / "model.safetensors"))
    w = sd["model.layers.0.mlp.down_proj.weight"].float().numpy()  # [64, 128]: 4 blocks per row
    blocks = w.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    span = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    # |error| bounds from the formats' definitions: scale d (and min m) are stored as fp16 (relative rounding
    # ≤ 2^-11), so a level k costs an extra k·d·2^-11. Q8_0 d=amax/127 (rounding: d/2); Q4_0 d=amax/8 and Q5_0
    # d=amax/16 (the far side clamps one level short: ≤ d); Q4_1 d=span/15, Q5_1 d=span/31 (rounding: d/2).
    amin = np.abs(blocks.min(axis=1, keepdims=True))
    e = 2.0 ** -11
    bounds = {"q8_0": amax / 127 * (0.5 + 127 * e), "q4_0": amax / 8 * (1 + 8 * e), "q5_0": amax / 16 * (1 + 16 * e),
              "q4_1": span / 15 * (0.5 + 15 * e) + amin * e, "q5_1": span / 31 * (0.5 + 31 * e) + amin * e}
    for quant, bound in bounds.items():
        out = tmp_path / f"b-{quant}.gguf"
        export_gguf(src, out, quant)
        t = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.ffn_down.weight")
        assert t.tensor_type == QT[quant]
        deq = gq.dequantize(t.data, t.tensor_type).reshape(-1, 32)
        err = np.abs(deq - blocks)
        assert (err <= bound + 1e-7).all(), (quant, float((err - bound).max()))
        assert err.max() > 0


def test_f32_tensors_equal_source_after_undoing_the_rope_permutation(models, tmp_path):
    from safetensors.torch import load_file

    src = models["llama"]
    out = tmp_path / "llama.gguf"
    export_gguf(src, out, "f32")
    sd = {k: v.float().numpy() for k, v in load_file(str(src / "model.safetensors")).items()}
    got = {t.name: np.asarray(t.data) for t in GGUFReader(out).tensors}
    cfg = json.loads((src / "config.json").read_text())
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]

    def unpermute(x, heads):  # independent inverse: GGML interleaved pairs -> HF halves, per head
        return x.reshape(heads, hd // 2, 2, -1).transpose(0, 2, 1, 3).reshape(x.shape)

    q, k = got["blk.1.attn_q.weight"], got["blk.1.attn_k.weight"]
    assert not np.array_equal(q, sd["model.layers.1.self_attn.q_proj.weight"])  # it is permuted ...
    np.testing.assert_array_equal(unpermute(q, cfg["num_attention_heads"]), sd["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(unpermute(k, cfg["num_key_value_heads"]), sd["model.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(got["blk.1.attn_v.weight"], sd["model.layers.1.self_attn.v_proj.weight"])
    np.testing.assert_array_equal(got["token_embd.weight"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["output.weight"], sd["lm_head.weight"])
    np.testing.assert_array_equal(got["output_norm.weight"], sd["model.norm.weight"])
    assert len(got) == len(sd)


def test_metadata_read_back(models, tmp_path):
    out = tmp_path / "qwen2.gguf"
    res = export_gguf(models["qwen2"], out, "q8_0")
    r = GGUFReader(out)
    cfg = json.loads((models["qwen2"] / "config.json").read_text())
    assert _field(r, "general.architecture") == "qwen2" == res.architecture
    assert _field(r, "general.file_type") == 7  # MOSTLY_Q8_0
    assert _field(r, "qwen2.context_length") == cfg["max_position_embeddings"] == 128
    assert _field(r, "qwen2.embedding_length") == 64
    assert _field(r, "qwen2.block_count") == 2
    assert _field(r, "qwen2.feed_forward_length") == 128
    assert _field(r, "qwen2.attention.head_count") == 4
    assert _field(r, "qwen2.attention.head_count_kv") == 2
    assert _field(r, "qwen2.rope.freq_base") == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert _field(r, "qwen2.rope.dimension_count") == 16
    assert _field(r, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert _field(r, "qwen2.vocab_size") == 384
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 384 and tokens[1] == "<s>" and tokens[2] == "</s>"
    assert _field(r, "tokenizer.ggml.bos_token_id") == 1
    assert _field(r, "tokenizer.ggml.eos_token_id") == 2
    assert _field(r, "tokenizer.ggml.unknown_token_id") == 0
    assert list(_field(r, "tokenizer.ggml.token_type")[:3]) == [3, 3, 3]  # CONTROL
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    assert _field(r, "tokenizer.chat_template") == CHAT_TEMPLATE
    merges = _field(r, "tokenizer.ggml.merges")
    src_merges = json.loads((models["qwen2"] / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in src_merges]
    names = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in names  # tied embeddings
    assert names["blk.0.attn_q.bias"] == T.F32 and names["blk.0.attn_norm.weight"] == T.F32
    assert names["blk.0.attn_q.weight"] == T.Q8_0 and names["token_embd.weight"] == T.Q8_0
    assert res.tensor_count == len(r.tensors) == 2 * 12 + 2
    assert res.tensor_types == {"Q8_0": 15, "F32": 11}
    # Qwen3 adds per-head q/k norms and its explicit head size
    r3 = GGUFReader(export_gguf(models["qwen3"], tmp_path / "q3.gguf", "f16").path)
    assert _field(r3, "general.architecture") == "qwen3"
    assert _field(r3, "qwen3.attention.key_length") == 128 == _field(r3, "qwen3.attention.value_length")
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= {t.name for t in r3.tensors}
    # Mistral is written as llama.cpp's llama architecture
    rm = GGUFReader(export_gguf(models["mistral"], tmp_path / "m.gguf", "f16").path)
    assert _field(rm, "general.architecture") == "llama" and _field(rm, "llama.rope.dimension_count") == 16


def test_result_records_data_version_size_and_ratio(models, tmp_path):
    out = tmp_path / "llama.gguf"
    seen = []
    res = export_gguf(models["llama"], out, "q8_0", progress=lambda d, n: seen.append((d, n)))
    assert res.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert res.bytes == out.stat().st_size
    assert res.source_bytes == (models["llama"] / "model.safetensors").stat().st_size - \
        (8 + int.from_bytes((models["llama"] / "model.safetensors").read_bytes()[:8], "little"))
    assert res.compression_ratio == pytest.approx(res.source_bytes / res.bytes, rel=1e-3)
    assert res.compression_ratio > 2.5  # f32 source -> ~8.5 bits per weight
    assert seen[-1] == (res.tensor_count, res.tensor_count) and len(seen) == res.tensor_count
    assert res.peak_rss_bytes > 0 and res.seconds >= 0 and res.quant == "q8_0" and res.family == "llama"
    # deterministic: same input, same bytes
    assert export_gguf(models["llama"], tmp_path / "again.gguf", "q8_0").sha256 == res.sha256


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_ids_and_chat_template_identical(models, family, tmp_path):
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    src = models[family]
    if family == "qwen2":  # give it Qwen2's real split regex, so the 'qwen2' pre-tokenizer path is exercised
        src = tmp_path / "qwen2-tok"
        shutil.copytree(models["qwen2"], src)
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        from merge_ops.gguf_tokenizer import _QWEN2_REGEX

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.save(str(src / "tokenizer.json"))
    out = tmp_path / "tok.gguf"
    export_gguf(src, out, "q8_0")
    assert _field(GGUFReader(out), "tokenizer.ggml.pre") == ("qwen2" if family == "qwen2" else "gpt-2")
    t0 = AutoTokenizer.from_pretrained(str(src))
    t1 = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in TEXTS + ["1234567 digits 89", "x" * 50]:
        assert t0(text).input_ids == t1(text).input_ids, text
        assert t1.decode(t1(text).input_ids) == t0.decode(t0(text).input_ids)
    msgs = [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]
    assert t1.chat_template == CHAT_TEMPLATE
    assert t0.apply_chat_template(msgs, tokenize=False) == t1.apply_chat_template(msgs, tokenize=False)
    assert (t1.bos_token, t1.eos_token, t1.unk_token) == ("<s>", "</s>", "<unk>")


def test_sentencepiece_style_tokenizer(tmp_path):
    """Llama-2-style vocabularies become GGUF's 'llama' tokenizer: byte tokens typed BYTE, scores, BOS added."""
    from transformers import AutoTokenizer

    from tests.gguf_models import save_sentencepiece_style_tokenizer

    src = save_family_model(tmp_path / "spm", "llama", vocab=464)
    n = save_sentencepiece_style_tokenizer(src)
    out = tmp_path / "spm.gguf"
    export_gguf(src, out, "f16")
    r = GGUFReader(out)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    types = list(_field(r, "tokenizer.ggml.token_type"))
    assert types[3:259] == [6] * 256 and types[0] == 2 and types[1:3] == [3, 3] and types[n:] == [5] * (464 - n)
    assert len(_field(r, "tokenizer.ggml.scores")) == 464
    assert _field(r, "tokenizer.ggml.add_bos_token") is True and _field(r, "tokenizer.ggml.add_eos_token") is False
    assert _field(r, "tokenizer.ggml.add_space_prefix") is True
    t0 = AutoTokenizer.from_pretrained(str(src))
    t1 = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    # transformers rebuilds these with a Metaspace pre-tokenizer, which treats runs of leading spaces and text
    # after a special token differently from the source's Prepend normalizer; ordinary text is identical,
    # byte fallback included
    for text in ["the quick brown fox", "two  spaces\n\nnew lines 12345", "Ünïcödé ✓ 東京", "merge models"]:
        assert t0(text).input_ids == t1(text).input_ids, text
        assert t0(text).input_ids[0] == 1


def test_llama_attention_biases_are_permuted_too(tmp_path):
    """Q/K biases get the same RoPE row permutation as their weights (compared with an independent inverse;
    transformers' GGUF loader cannot be the oracle here: the file has no attention_bias key, so it builds a
    bias-free Llama -- llama.cpp uses the bias tensors whenever they are present)."""
    from safetensors.torch import load_file

    src = save_family_model(tmp_path / "bias", "llama", attention_bias=True)
    res = export_gguf(src, tmp_path / "bias.gguf", "f32")
    got = {t.name: np.asarray(t.data) for t in GGUFReader(res.path).tensors}
    sd = {k: v.float().numpy() for k, v in load_file(str(src / "model.safetensors")).items()}
    hd = 16

    def unpermute(x, heads):
        return x.reshape(heads, hd // 2, 2).transpose(0, 2, 1).reshape(x.shape)

    for layer in range(2):
        q = got[f"blk.{layer}.attn_q.bias"]
        assert not np.array_equal(q, sd[f"model.layers.{layer}.self_attn.q_proj.bias"])
        np.testing.assert_array_equal(unpermute(q, 4), sd[f"model.layers.{layer}.self_attn.q_proj.bias"])
        np.testing.assert_array_equal(unpermute(got[f"blk.{layer}.attn_k.bias"], 2),
                                      sd[f"model.layers.{layer}.self_attn.k_proj.bias"])
        np.testing.assert_array_equal(got[f"blk.{layer}.attn_v.bias"], sd[f"model.layers.{layer}.self_attn.v_proj.bias"])
        np.testing.assert_array_equal(got[f"blk.{layer}.attn_output.bias"],
                                      sd[f"model.layers.{layer}.self_attn.o_proj.bias"])


def test_quant_names_match_the_pipeline_spec():
    from merge_ops.gguf_quant import ALL_QUANTS
    from pipelines.spec import GGUF_QUANTS

    assert set(ALL_QUANTS) == set(GGUF_QUANTS)


def test_rows_not_dividing_the_block_stay_f16_with_a_note(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_family_model(tmp_path / "odd", "llama", hidden=48)  # 48 % 32 != 0
    res = export_gguf(src, tmp_path / "odd.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(res.path).tensors}
    assert types["blk.0.attn_q.weight"] == T.F16
    assert types["blk.0.ffn_down.weight"] == T.Q8_0  # 96 columns divide 32
    assert any("row length 48" in n and "F16" in n for n in res.notes)
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(ids).logits
        b = _load_gguf(Path(res.path))(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.06


def test_llama3_rope_scaling_becomes_rope_freqs_tensor(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    src = save_family_model(tmp_path / "l3", "llama", rope_parameters=rope, max_position_embeddings=256)
    res = export_gguf(src, tmp_path / "l3.gguf", "f32")
    got = next(t for t in GGUFReader(res.path).tensors if t.name == "rope_freqs.weight").data
    cfg = LlamaConfig.from_pretrained(str(src))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = cfg.head_dim
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    np.testing.assert_allclose(np.asarray(got), (plain / scaled).numpy(), rtol=1e-5)
    assert {float(x) for x in np.asarray(got)} >= {1.0, 8.0}  # both ends of the blend present
    assert any("llama3" in n for n in res.notes)


def test_sharded_bf16_source(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_family_model(tmp_path / "sh", "llama", dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM as A

    A.from_pretrained(str(src), dtype=torch.bfloat16).save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "sharded" / f.name)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    res = export_gguf(tmp_path / "sharded", tmp_path / "sh.gguf", "bf16")
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(ids).logits
        b = _load_gguf(Path(res.path))(ids).logits
    assert (a - b).abs().max().item() <= 1e-4  # bf16 -> bf16 is lossless
    assert res.compression_ratio == pytest.approx(1.0, abs=0.05)


# -- errors -------------------------------------------------------------------------------------------------------

def test_unsupported_architecture_names_the_supported_families(models, tmp_path):
    src = tmp_path / "gpt2ish"
    shutil.copytree(models["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GgufExportError, match=r"GPT2LMHeadModel.*not supported.*llama.*mistral.*qwen2.*qwen3"):
        export_gguf(src, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_bad_inputs_fail_before_writing(models, tmp_path, monkeypatch):
    with pytest.raises(GgufExportError, match=r"unknown GGUF quant 'q9_0'.*q8_0"):
        export_gguf(models["llama"], tmp_path / "x.gguf", "q9_0")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(GgufExportError, match=r"q3_k_m.*llama-cpp-python.*q4_k_m"):
        export_gguf(models["llama"], tmp_path / "x.gguf", "Q3_K_M")
    with pytest.raises(GgufExportError, match="does not exist"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    notok = tmp_path / "notok"
    shutil.copytree(models["llama"], notok)
    (notok / "tokenizer.json").unlink()
    with pytest.raises(GgufExportError, match="no tokenizer.json"):
        export_gguf(notok, tmp_path / "x.gguf")
    with pytest.raises(GgufExportError, match="is a directory"):
        export_gguf(models["llama"], tmp_path)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_interrupted_export_leaves_no_file_and_keeps_the_old_one(models, tmp_path):
    out = tmp_path / "m.gguf"

    def stop(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(models["llama"], out, "q8_0", progress=stop)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous export")
    with pytest.raises(KeyboardInterrupt):
        export_gguf(models["llama"], out, "q8_0", progress=stop)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_cli_export_gguf(models, tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", str(models["qwen3"]), str(out), "--quant", "q5_1", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"ok: {out} (q5_1, qwen3 -> qwen3") and "sha256" in line
    assert GGUFReader(out).fields["general.file_type"].contents() == 9
    assert main(["export-gguf", str(models["qwen3"]), str(tmp_path / "y.gguf"), "--quant", "q3_0"]) == 2
    assert "unknown GGUF quant 'q3_0'" in capsys.readouterr().err


# -- k-quants ----------------------------------------------------------------------------------------------------

def _kq_data() -> np.ndarray:
    """Gaussian rows plus the corner cases of the reference algorithms."""
    x = (np.random.default_rng(0).standard_normal((48, 512)) * 0.02).astype(np.float32)
    x[3, :256] = 0  # an all-zero super-block
    x[4, :32] = 0  # an all-zero sub-block inside a non-zero super-block
    x[5, 10] = 0.5  # an outlier
    x[6] = np.abs(x[6])  # all positive: the min is clamped to 0
    x[7, 32:64] = -0.001  # a constant sub-block
    x[8] *= 1e-6  # tiny values
    return x


@pytest.mark.parametrize("ktype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_kquant_encoders_compiled_and_numpy_agree_and_decode(ktype):
    from merge_ops.gguf_kquants import ENCODERS, _numba_kernels

    x = _kq_data()
    vec = ENCODERS[ktype](x, use_numba=False)
    if _numba_kernels() is not None:  # the two implementations of the reference algorithm agree bit for bit
        np.testing.assert_array_equal(ENCODERS[ktype](x), vec)
    bs, ts = gq.GGML_QUANT_SIZES[ktype]
    assert vec.shape == (48, 512 // bs * ts) and vec.dtype == np.uint8
    deq = gq.dequantize(vec, ktype)  # gguf's decoder is the oracle for the byte layout
    assert np.all(deq[3, :256] == 0) and np.all(deq[4, :32] == 0)
    g = np.r_[0:3, 9:48]  # the Gaussian rows
    rel = np.sqrt(((deq[g] - x[g]) ** 2).mean() / (x[g] ** 2).mean())
    # measured here: Q4_K 0.0716, Q5_K 0.0364, Q6_K 0.0184; the min/max formats of the same size do worse
    # (Q4_1 0.079, Q5_1 0.038): the reference search must beat them
    bound, rival = {T.Q4_K: (0.075, T.Q4_1), T.Q5_K: (0.038, T.Q5_1), T.Q6_K: (0.020, T.Q5_1)}[ktype]
    rival_rel = np.sqrt(((gq.dequantize(gq.quantize(x[g], rival), rival) - x[g]) ** 2).mean() / (x[g] ** 2).mean())
    assert rel < bound and rel < rival_rel, (rel, rival_rel)
    # a value never lands further than one quantization step of its sub-block from the source
    row = deq[5]
    assert abs(row[10] - 0.5) < 0.5 * 0.02


_GGML_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
void ggml_log_internal(int level, const char * fmt, ...) {}
const char * ggml_type_name(int t) { return "?"; }
size_t ggml_type_size(int t) { abort(); }
size_t ggml_row_size(int t, int64_t n) { abort(); }
"""


@pytest.mark.heavy
@pytest.mark.skipif(not os.environ.get("MERGELINE_GGML_SRC") or not shutil.which("cc"),
                    reason="set MERGELINE_GGML_SRC to a ggml source tree (with src/ggml-quants.c) and have a C compiler")
def test_kquants_bit_exact_vs_ggml_c_reference(tmp_path):
    """The strongest oracle: ggml's own reference quantizers, compiled from a ggml source tree (e.g. the one vendored
    in the ggml-python sdist: ``pip download --no-deps --no-binary=:all: ggml-python``), must produce the same bytes
    as ours. Built without -march so the C compiler cannot fuse multiply-adds."""
    import ctypes

    from merge_ops.gguf_kquants import ENCODERS

    root = Path(os.environ["MERGELINE_GGML_SRC"])
    (tmp_path / "stubs.c").write_text(_GGML_STUBS)
    lib_path = tmp_path / "libggmlquants.so"
    subprocess.run(["cc", "-O2", "-fPIC", "-shared", "-std=c11", "-D_GNU_SOURCE", f"-I{root / 'include'}",
                    f"-I{root / 'src'}", str(root / "src" / "ggml-quants.c"), str(tmp_path / "stubs.c"), "-o",
                    str(lib_path), "-lm"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    rng = np.random.default_rng(1)
    data = [_kq_data(), rng.uniform(-1, 1, (64, 1024)).astype(np.float32),
            (rng.standard_t(2, (64, 1024)) * 0.01).astype(np.float32)]
    funcs = {T.Q4_K: "quantize_row_q4_K_ref", T.Q5_K: "quantize_row_q5_K_ref", T.Q6_K: "quantize_row_q6_K_ref",
             T.Q8_0: "quantize_row_q8_0_ref", T.Q4_0: "quantize_row_q4_0_ref", T.Q4_1: "quantize_row_q4_1_ref",
             T.Q5_0: "quantize_row_q5_0_ref", T.Q5_1: "quantize_row_q5_1_ref"}
    for x in data:
        x = np.ascontiguousarray(x)
        for t, fname in funcs.items():
            bs, ts = gq.GGML_QUANT_SIZES[t]
            want = np.zeros((x.shape[0], x.shape[1] // bs * ts), np.uint8)
            fn = getattr(lib, fname)
            fn.restype = None
            fn(x.ctypes.data_as(ctypes.c_void_p), want.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
            if t in ENCODERS:
                np.testing.assert_array_equal(ENCODERS[t](x), want, err_msg=f"{t.name} (numba)")
                np.testing.assert_array_equal(ENCODERS[t](x, use_numba=False), want, err_msg=f"{t.name} (numpy)")
            else:
                np.testing.assert_array_equal(gq.quantize(x, t), want, err_msg=t.name)


def test_kquant_mix_matches_llama_cpp_rules():
    from merge_ops.gguf_kquants import mix_type, use_more_bits

    # llama.cpp's Q4_K_M on a 32-layer model gives Q6_K to attn_v/ffn_down of these layers
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    shape = (4096, 4096)
    assert mix_type("q4_k_m", "blk.6.attn_v.weight", shape, 32, True) == T.Q6_K
    assert mix_type("q4_k_m", "blk.7.attn_v.weight", shape, 32, True) == T.Q4_K
    assert mix_type("q4_k_m", "blk.7.ffn_down.weight", shape, 32, True) == T.Q4_K
    assert mix_type("q5_k_m", "blk.31.ffn_down.weight", shape, 32, True) == T.Q6_K
    assert mix_type("q4_k_m", "blk.0.attn_q.weight", shape, 32, True) == T.Q4_K
    assert mix_type("q4_k_s", "blk.3.attn_v.weight", shape, 32, True) == T.Q5_K
    assert mix_type("q4_k_s", "blk.4.attn_v.weight", shape, 32, True) == T.Q4_K
    assert mix_type("q4_k_s", "blk.3.ffn_down.weight", shape, 32, True) == T.Q5_K
    assert mix_type("q5_k_s", "blk.0.attn_v.weight", shape, 32, True) == T.Q5_K
    assert mix_type("q4_k_m", "output.weight", shape, 32, True) == T.Q6_K
    assert mix_type("q4_k_m", "token_embd.weight", shape, 32, True) == T.Q4_K
    assert mix_type("q4_k_m", "token_embd.weight", shape, 32, False) == T.Q6_K  # tied: treated as the output
    assert mix_type("q6_k", "output.weight", (100, 4000), 32, True) == T.Q8_0  # rows not a multiple of 256


KQUALITY = {"q4_k_s": (0.4, 0.35), "q4_k_m": (0.4, 0.35), "q5_k_s": (0.22, 0.65), "q5_k_m": (0.22, 0.65),
            "q6_k": (0.12, 0.75)}


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.heavy),
                                    pytest.param("qwen3", marks=pytest.mark.heavy)])
def test_kquant_logits_round_trip(family, tmp_path):
    """k-quant GGUFs load in transformers; their logits equal those of the source with each weight replaced by
    the decoded k-quant bytes of its type (exact plumbing), and lose a bounded amount against the source."""
    from transformers import AutoModelForCausalLM

    from merge_ops.gguf_kquants import ENCODERS

    src = save_family_model(tmp_path / f"k-{family}", family, hidden=256, layers=3, tie=(family == "qwen2"),
                            initializer_range=0.05)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(ids).logits
    hf_to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    table = []
    for quant, (max_rel, min_top1) in KQUALITY.items():
        res = export_gguf(src, tmp_path / f"{quant}.gguf", quant)
        types = {t.name: t.tensor_type for t in GGUFReader(res.path).tensors}
        assert {T.Q6_K} <= set(types.values()) and res.tensor_types.get("F32", 0) > 0
        with torch.no_grad():
            b = _load_gguf(Path(res.path))(ids).logits
            fake = AutoModelForCausalLM.from_config(ref.config)
            fake.load_state_dict(ref.state_dict())
            for name, p in fake.named_parameters():
                if p.ndim < 2:
                    continue
                gname = hf_to_gguf.get(name) or re.sub(
                    r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight",
                    lambda m: f"blk.{m[1]}." + {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                                                "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}[m[3]]
                    + ".weight", name)
                if family == "qwen2" and name == "lm_head.weight":
                    gname = "token_embd.weight"
                t = types[gname]
                w = p.detach().numpy().astype(np.float32)
                enc = ENCODERS[t](w) if t in ENCODERS else gq.quantize(w, t)
                p.copy_(torch.from_numpy(gq.dequantize(enc, t)))
            oracle = fake(ids).logits
        assert (oracle - b).abs().max().item() <= 1e-4, (family, quant)
        rel = ((a - b).norm() / a.norm()).item()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        table.append(f"{quant}: rel {rel:.4f} top1 {top1:.3f} ratio {res.compression_ratio:.2f}")
        assert rel <= max_rel and top1 >= min_top1, (family, quant, rel, top1)
    print(f"\n{family} k-quants: " + "; ".join(table))


@pytest.mark.heavy
def test_llama_cpp_only_quants_with_llama_cpp(models, tmp_path):
    pytest.importorskip("llama_cpp")
    src = save_family_model(tmp_path / "kq", "llama", hidden=256)
    res = export_gguf(src, tmp_path / "q3_k_m.gguf", "q3_k_m")
    types = {t.tensor_type for t in GGUFReader(res.path).tensors}
    assert T.Q3_K in types
    assert res.sha256 == hashlib.sha256(Path(res.path).read_bytes()).hexdigest()


# -- memory -------------------------------------------------------------------------------------------------------

def _synthetic_llama(root: Path, hidden: int, vocab: int, layers: int, inter: int, tokenizer_from: Path) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 4, hidden),
                   p + "self_attn.v_proj.weight": (hidden // 4, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)})
    # one safetensors file per layer group keeps the generator's own memory small
    for k, (name, shape) in enumerate(sd.items()):
        save_file({name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)}, str(root / f"part-{k:04d}.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": inter, "num_attention_heads": 16,
           "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(cfg))
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy(f, root / f.name)
    return root


@pytest.mark.heavy
@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs GNU time")
def test_peak_rss_is_flat_in_model_size(models, tmp_path):
    results = {}
    for label, dims in {"small": (1024, 8192, 4, 2816), "large": (2048, 16384, 4, 5632)}.items():
        src = _synthetic_llama(tmp_path / label, *dims, tokenizer_from=models["llama"])
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        out = tmp_path / f"{label}.gguf"
        r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "pipelines.cli", "export-gguf", str(src),
                            str(out), "--quant", "q8_0", "--no-progress"], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
        results[label] = (size, rss, out.stat().st_size)
        shutil.rmtree(src)
        out.unlink()
    (s_size, s_rss, _), (l_size, l_rss, l_out) = results["small"], results["large"]
    print(f"\npeak RSS exporting q8_0: {s_size / 1e6:.0f} MB model -> {s_rss:.0f} MiB; "
          f"{l_size / 1e6:.0f} MB model -> {l_rss:.0f} MiB")
    assert l_size > 3.5 * s_size
    assert l_rss <= 1.15 * s_rss, results
    assert l_rss < l_size / 2**20, results  # far below the model size
