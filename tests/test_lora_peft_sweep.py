"""LoRA-into-base parity with PEFT on adapters and architectures beyond tests/test_lora_peft.py.

Each case builds a real PEFT adapter (peft 0.21) on a tiny local model of a real transformers architecture, perturbs
every saved tensor, merges it with mergeline's ``merge_lora`` into a real output directory, and checks it against
PEFT's ``PeftModel.from_pretrained(original base).merge_and_unload()`` three ways:

* every output tensor equals the tensor PEFT's merged model saves under that name (max |Δ| ≤ 1e-6 in fp32), and the
  output holds exactly the tensors PEFT's merged ``save_pretrained`` writes (a tied model: no ``lm_head.weight``);
* the output directory loaded with transformers (config included, so ``tie_word_embeddings`` matters) has every
  parameter of PEFT's merged model in memory, tied ones included;
* at least one tensor changed (a no-op merge cannot pass).

The cases are the ones a sweep over ~240 combinations (architectures × tying × LoRA features × init methods × dtypes,
see /work/notes/README-peftsweep.md) found wrong or refused before the fixes, plus one representative of each
architecture family that was already right.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from merge_ops.api import merge, merge_lora
from merge_ops.checkpoint import Checkpoint
from merge_ops.errors import InputError, UnsupportedError
from merge_ops.lora import LoraAdapter
from tests.adapter_noise import perturb_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

TOL = 1e-6
P = "base_model.model."
LL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# every test twice: default adapter-module residency and one module (tests/conftest.py::resident_modules)
pytestmark = pytest.mark.usefixtures("resident_modules")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


# -- tiny bases of real architectures ----------------------------------------------------------------------------------
def _config(arch: str, tie: bool | None):
    T = transformers
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    c = {
        "llama": lambda: T.LlamaConfig(**small),
        "qwen2": lambda: T.Qwen2Config(**small),  # q/k/v biases
        "gemma2": lambda: T.Gemma2Config(head_dim=8, **small),
        "phi3": lambda: T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **small),  # fused qkv/gate_up
        "mixtral": lambda: T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=8, **small),
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                                     eos_token_id=0),  # Conv1D, embedding named wte
        "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=128, max_position_embeddings=64),
        "llava": lambda: T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=16, patch_size=8),
            text_config=T.LlamaConfig(**small), image_token_index=5),
        "qwen2_vl": lambda: T.Qwen2VLConfig(
            text_config=dict(small, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}), vocab_size=128,
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2)),
        "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=32, vocab_size=128, max_position_embeddings=64, pad_token_id=1),
    }[arch]()
    if tie is not None:
        c.tie_word_embeddings = tie
    return c


_MODEL_CLS = {"llava": transformers.LlavaForConditionalGeneration,
              "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}


def model_cls(base: Path):
    """The transformers class to load ``base`` with (vision-language models are not AutoModelForCausalLM)."""
    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch) if arch in {c.__name__ for c in _MODEL_CLS.values()} else AutoModelForCausalLM


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``bases(arch, tie=None, dtype=float32)`` → a saved tiny model (built once per module), every parameter
    randomised (non-zero biases, norms ≠ 1)."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict[tuple, Path] = {}

    def get(arch: str, tie: bool | None = None, dtype: torch.dtype = torch.float32) -> Path:
        key = (arch, tie, dtype)
        if key not in cache:
            torch.manual_seed(1)
            cfg = _config(arch, tie)
            m = _MODEL_CLS[arch](cfg) if arch in _MODEL_CLS else AutoModelForCausalLM.from_config(cfg)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            path = root / f"{arch}-{tie}-{str(dtype)[6:]}"
            m.to(dtype).save_pretrained(str(path))
            cache[key] = path
        return cache[key]

    return get


def perturb(adapter_dir: Path, seed: int = 0) -> None:
    """Seeded noise on every saved tensor, each kept in its dtype: nothing can equal an init value or the base."""
    perturb_adapter(adapter_dir, seed, keep_dtype=True)


def make_adapter(tmp_path: Path, base: Path, name: str = "adapter", *, init=False, perturb_it: bool = True,
                 dtype: torch.dtype = torch.float32, adapter_name: str = "default", **lora_kw) -> Path:
    torch.manual_seed(0)
    model = model_cls(base).from_pretrained(str(base), dtype=dtype)
    lora_kw.setdefault("r", 4)
    lora_kw.setdefault("lora_alpha", 8)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=init, **lora_kw), adapter_name=adapter_name)
    out = tmp_path / name
    pm.save_pretrained(str(out))
    if adapter_name != "default":
        out = out / adapter_name
    if perturb_it:
        perturb(out)
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def assert_peft_parity(tmp_path: Path, base: Path, adapter: Path, *, dtype: torch.dtype = torch.float32,
                       tol: float | None = TOL, out_name: str = "merged") -> dict:
    """Merge with mergeline and compare with PEFT as described in the module docstring. ``tol=None``: one rounding
    step of ``dtype`` (bf16: |Δ| ≤ 2⁻⁷·(|PEFT| + |base|)); returns the output's tensors, config and manifest."""
    merged = PeftModel.from_pretrained(model_cls(base).from_pretrained(str(base), dtype=dtype),
                                       str(adapter)).merge_and_unload()
    ref = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    merged.save_pretrained(str(tmp_path / f"{out_name}-peft"))
    saved = _tensors(tmp_path / f"{out_name}-peft")

    out = tmp_path / out_name
    merge_lora(base, adapter, out)
    ours = _tensors(out)
    base_sd = _tensors(base)
    assert set(ours) == set(saved), (sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours)))

    def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.dtype, want.dtype)
        d = (got.double() - want.double()).abs()
        if tol is None:
            b = base_sd.get(name, want).double().abs()
            bound = 2.0 ** -7 * (want.double().abs() + b)
            assert bool((d <= bound).all()), f"{name}: {int((d > bound).sum())} elements over one bf16 step"
        else:
            assert d.max().item() <= tol, f"{name}: max abs diff {d.max().item()}"

    for k in ours:
        close(k, ours[k], saved[k])
    reloaded = model_cls(base).from_pretrained(str(out), dtype=dtype).state_dict()
    assert set(reloaded) == set(ref)
    for k in ref:
        close(k, reloaded[k], ref[k])
    assert any(not torch.equal(ours[k], base_sd[k]) for k in ours if k in base_sd), "merge changed nothing"
    return {"tensors": ours, "config": json.loads((out / "config.json").read_text()),
            "manifest": json.loads((out / "mergeline.json").read_text()), "base": base_sd}


# -- tied input/output embeddings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,targets,kw", [
    ("llama", ["lm_head"], {}),
    ("qwen2", ["embed_tokens", "lm_head", "q_proj"], {}),
    ("gpt2", ["wte", "lm_head", "c_attn"], {"use_dora": True}),
    ("falcon", ["word_embeddings", "lm_head"], {"use_dora": True}),
])
def test_tied_embeddings_lora_on_head(tmp_path, bases, arch, targets, kw):
    """Was refused ("base has no lm_head.weight"). In PEFT both modules hold one Parameter: the head's update (and the
    embedding's, and the saved base_layer copies, the head's last) all land on the stored embedding; the output stays
    tied, without lm_head.weight, and the *input* embedding changes too — as in PEFT."""
    base = bases(arch, True)
    ad = make_adapter(tmp_path, base, target_modules=targets, **kw)
    res = assert_peft_parity(tmp_path, base, ad)
    assert "lm_head.weight" not in res["tensors"] and res["config"]["tie_word_embeddings"] is True
    emb = {"gpt2": "transformer.wte.weight", "falcon": "transformer.word_embeddings.weight"}.get(
        arch, "model.embed_tokens.weight")
    assert not torch.equal(res["tensors"][emb], res["base"][emb])
    assert any("tied to" in w for w in res["manifest"]["warnings"])
    adapter = LoraAdapter.open(ad)
    adapter.check_base(Checkpoint.open(base))
    assert "lm_head.weight" not in adapter.changed_tensors() and emb in adapter.changed_tensors()
    # one plain update on the shared tensor keeps the numba fast path; a second (the embedding's) or DoRA does not
    assert (adapter.plain_update(emb) is not None) == (targets == ["lm_head"])


@pytest.mark.parametrize("arch,saved", [("llama", "lm_head"), ("qwen2", "embed_tokens"), ("gpt2", "wte")])
def test_tied_embeddings_modules_to_save_unties(tmp_path, bases, arch, saved):
    """Was refused (lm_head copy) or silently wrong (embedding copy: the reloaded head followed the new embedding).
    A modules_to_save copy replaces one of the two modules only, so PEFT's merged model is untied: the output has its
    own lm_head.weight and tie_word_embeddings false, exactly what transformers saves for PEFT's merged model."""
    base = bases(arch, True)
    ad = make_adapter(tmp_path, base, target_modules=["c_attn" if arch == "gpt2" else "q_proj"],
                      modules_to_save=[saved])
    res = assert_peft_parity(tmp_path, base, ad)
    assert "lm_head.weight" in res["tensors"] and res["config"]["tie_word_embeddings"] is False
    emb = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    assert not torch.equal(res["tensors"]["lm_head.weight"], res["tensors"][emb])
    assert any("tie_word_embeddings is set to false" in w for w in res["manifest"]["warnings"])


def test_untied_head_in_a_merge_led_by_a_tied_model_warns(tmp_path, bases):
    """A merge writes the tensors of its base_model / first model: led by the tied base, the head the adapter untied
    cannot be in the output; the manifest says so (and how to keep it)."""
    base = bases("llama", True)
    ad = make_adapter(tmp_path, base, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    res = merge({"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                                      {"model": f"{base}+{ad}", "parameters": {"weight": 0.5}}]},
                tmp_path / "out")
    assert "lm_head.weight" not in _tensors(tmp_path / "out")
    assert any("unties 'lm_head.weight'" in w and "base_model / first model" in w for w in res.warnings)


def test_tied_embeddings_ensure_weight_tying(tmp_path, bases):
    """``ensure_weight_tying``: modules_to_save copies stay tied (the head's saved copy loads last and wins). With LoRA
    on embedding + head, PEFT makes the head's LoRA the embedding's (lora_A = Bᵀ, lora_B = Aᵀ); the head's saved
    values win for both and *both* are merged (the update lands twice). On GPT-2 (embedding named ``wte``, which PEFT
    does not recognise) PEFT does not recreate the head's LoRA at load: its saved keys go unused."""
    llama, gpt2 = bases("llama", True), bases("gpt2", True)
    res = assert_peft_parity(tmp_path, llama, make_adapter(tmp_path, llama, "mts", target_modules=["q_proj"],
                                                           modules_to_save=["embed_tokens"], ensure_weight_tying=True),
                             out_name="m1")
    assert res["config"]["tie_word_embeddings"] is True and "lm_head.weight" not in res["tensors"]
    # perturbed independently: the file's head LoRA differs from the embedding's (PEFT: the head's values win)
    ad = make_adapter(tmp_path, llama, "lora", target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    assert_peft_parity(tmp_path, llama, ad, out_name="m2")
    ad = make_adapter(tmp_path, gpt2, "gpt2", target_modules=["wte", "lm_head"], ensure_weight_tying=True)
    assert any(k.startswith(P + "lm_head.lora_A") for k in load_file(str(ad / "adapter_model.safetensors")))
    assert_peft_parity(tmp_path, gpt2, ad, out_name="m3")


# -- architectures and config variants (already right; kept as the verified list) --------------------------------------
@pytest.mark.parametrize("arch,kw", [
    ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"], rank_pattern={"qkv_proj": 8},
                  alpha_pattern={r"layers\.1\..*": 3})),
    ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    ("falcon", dict(target_modules=["query_key_value", "dense"], bias="all")),
    ("gemma2", dict(target_modules="all-linear", use_dora=True, use_rslora=True)),
    ("mixtral", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("opt", dict(target_modules="all-linear", modules_to_save=["final_layer_norm"])),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("llama", dict(target_modules=r".*\.(q|v)_proj", use_rslora=True, r=9)),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*layers\.0.*")),
    ("llama", dict(target_modules=LL, rank_pattern={"proj": 2, r".*_proj": 3, "layers.0.mlp.up_proj": 5},
                   alpha_pattern={r"self_attn\.(q|k)_proj": 3, "q_proj": 77})),
])
def test_architectures_and_config_variants(tmp_path, bases, arch, kw):
    assert_peft_parity(tmp_path, bases(arch, False if arch in ("gemma2",) else None), make_adapter(
        tmp_path, bases(arch, False if arch in ("gemma2",) else None), **kw))


@pytest.mark.parametrize("arch,targets,ckpt_name", [
    ("llava", r".*(language_model.*\.(q_proj|v_proj)|lm_head)", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("qwen2_vl", r".*language_model.*\.(q_proj|down_proj)", "model.layers.0.self_attn.q_proj.weight"),
    ("gpt_neox", ["query_key_value", "lm_head"], "embed_out.weight"),
])
def test_transformers5_runtime_names_mapped_to_checkpoint_names(tmp_path, bases, arch, targets, ckpt_name):
    """Was refused ("base has no model.language_model…"). Adapters trained under transformers 5 name modules as the
    loaded model does (model.language_model.layers…, lm_head), while checkpoints on disk keep the original layout
    (Llava: language_model.model.layers…, Qwen2-VL: model.layers…, GPT-NeoX: embed_out); transformers renames on load
    and back on save, so PEFT never sees it. mergeline maps the names back and writes the checkpoint's names."""
    base = bases(arch, False if arch == "gpt_neox" else None)
    ad = make_adapter(tmp_path, base, target_modules=targets)
    keys = load_file(str(ad / "adapter_model.safetensors"))
    assert not any(k.startswith(P + ckpt_name.rsplit(".", 1)[0]) for k in keys)  # the adapter uses the other name
    res = assert_peft_parity(tmp_path, base, ad)
    assert not torch.equal(res["tensors"][ckpt_name], res["base"][ckpt_name])
    assert any("runtime module names" in w for w in res["manifest"]["warnings"])


def test_tied_vlm_modules_to_save_unties_the_text_config(tmp_path, bases):
    """A tied Qwen2-VL (runtime names, tie flag also in text_config) with a modules_to_save copy of lm_head: the output
    is untied in both config levels, as transformers saves PEFT's merged model."""
    root = tmp_path / "base"
    torch.manual_seed(1)
    cfg = _config("qwen2_vl", None)
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = True
    m = transformers.Qwen2VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m.save_pretrained(str(root))
    assert not any("lm_head" in k for k in _tensors(root))
    ad = make_adapter(tmp_path, root, target_modules=r".*language_model.*\.q_proj", modules_to_save=["lm_head"])
    res = assert_peft_parity(tmp_path, root, ad)
    assert res["config"]["tie_word_embeddings"] is False and res["config"]["text_config"]["tie_word_embeddings"] is False


def test_moe_target_parameters_refused(tmp_path, bases):
    """transformers 5 fuses MoE experts into 3-D parameters: PEFT's all-linear then sets target_parameters."""
    ad = make_adapter(tmp_path, bases("mixtral"), target_modules="all-linear", perturb_it=False)
    assert json.loads((ad / "adapter_config.json").read_text())["target_parameters"]
    with pytest.raises(UnsupportedError, match=r"target_parameters.*gate_up_proj.*mixture-of-experts.*explicit "
                                               r"target_modules"):
        LoraAdapter.open(ad)


# -- init methods that modify the base at load (PiSSA, OLoRA) ----------------------------------------------------------
@pytest.mark.parametrize("arch,init,kw", [
    ("llama", "pissa", dict(target_modules=LL + ["embed_tokens"], use_dora=True, rank_pattern={"down_proj": 6})),
    ("llama", "olora", dict(target_modules=["q_proj", "v_proj", "lm_head"], use_rslora=True)),
    ("gpt2", "pissa", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
])
def test_pissa_olora_merge_like_peft_on_the_original_base(tmp_path, bases, arch, init, kw):
    """Was silently wrong (off by the principal components). A PiSSA/OLoRA adapter saved without conversion carries
    init_lora_weights "pissa"/"olora": PEFT's from_pretrained rebuilds the residual base W − s·B₀A₀ (SVD / QR of W)
    and merges into it. mergeline does the same (whole tensor, so never the numba row path); Embedding layers ignore
    the init, and a saved base_layer copy (lm_head) overwrites the residual in PEFT, so it merges as plain LoRA."""
    base = bases(arch)
    ad = make_adapter(tmp_path, base, init=init, **kw)
    adapter = LoraAdapter.open(ad)
    adapter.check_base(Checkpoint.open(base))
    name = "transformer.h.0.attn.c_attn.weight" if arch == "gpt2" else "model.layers.0.self_attn.q_proj.weight"
    assert not adapter.is_row_local(name) and adapter.plain_update(name) is None
    if arch == "llama" and init == "olora":
        assert adapter.plain_update("lm_head.weight") is not None  # the copy overrides the residual: plain LoRA
    assert_peft_parity(tmp_path, base, ad)


def test_pissa_on_bf16_base(tmp_path, bases):
    """PEFT rounds the residual to the base dtype before merging in bf16: same within one bf16 rounding step."""
    base = bases("llama", None, torch.bfloat16)
    assert_peft_parity(tmp_path, base, make_adapter(tmp_path, base, init="pissa", dtype=torch.bfloat16,
                                                    target_modules=LL), dtype=torch.bfloat16, tol=None)


def test_converted_pissa_is_plain_lora(tmp_path, bases):
    """save_pretrained(path_initial_model_for_weight_conversion=...) turns PiSSA into a plain rank-2r LoRA on the
    original base (config init_lora_weights true)."""
    base = bases("llama")
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                        LoraConfig(r=4, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]))
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "conv"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    adapter = LoraAdapter.open(tmp_path / "conv")
    adapter.check_base(Checkpoint.open(base))
    assert adapter.plain_update("model.layers.1.self_attn.v_proj.weight") is not None  # the fast path again
    assert_peft_parity(tmp_path, base, tmp_path / "conv")


@pytest.mark.parametrize("init,match", [
    ("pissa_niter_4", "randomized SVD"), ("corda", "CorDA"), ("loftq", "LoftQ"), ("kaiming_v2", "does not know"),
])
def test_unreproducible_inits_refused(tmp_path, bases, init, match):
    ad = make_adapter(tmp_path, bases("llama"), target_modules=["q_proj"], perturb_it=False)
    cfg_path = ad / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "init_lora_weights": init}))
    with pytest.raises(UnsupportedError, match=match) as ei:
        LoraAdapter.open(ad)
    assert "init_lora_weights" in str(ei.value) and str(cfg_path) in str(ei.value)


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", "mica", "lora_ga"])
def test_inits_that_leave_the_base_alone(tmp_path, bases, init):
    """PEFT's load keeps the base for these (checked: same merge as a plain adapter): plain LoRA, fast path."""
    base = bases("llama")
    ad = make_adapter(tmp_path, base, target_modules=["q_proj", "down_proj"])
    cfg_path = ad / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "init_lora_weights": init}))
    adapter = LoraAdapter.open(ad)
    adapter.check_base(Checkpoint.open(base))
    assert adapter.plain_update("model.layers.0.mlp.down_proj.weight") is not None
    assert_peft_parity(tmp_path, base, ad)  # PEFT loads the adapter with this init value on the original base


# -- dtypes ------------------------------------------------------------------------------------------------------------
def _cast(adapter_dir: Path, dtype: torch.dtype) -> None:
    f = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in load_file(str(f)).items()}, str(f))


def test_low_precision_adapter_on_fp32_base(tmp_path, bases):
    """bf16 adapter tensors, including the lm_head base_layer copy, on an fp32 base: exact. Was wrong: the output
    tensor took the *copy's* dtype (bf16) instead of the base parameter's, as PEFT loads copies into the base."""
    base = bases("llama")
    ad = make_adapter(tmp_path, base, target_modules=LL + ["lm_head"], use_dora=True)
    _cast(ad, torch.bfloat16)
    res = assert_peft_parity(tmp_path, base, ad)
    assert res["tensors"]["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_adapter_on_bf16_base(tmp_path, bases, adapter_dtype):
    """bf16 base: PEFT merges in bf16 (delta rounded, then the sum); mergeline adds in fp32 and rounds once. They
    agree within one bf16 rounding step of the result (observed: bit-identical on most tensors)."""
    base = bases("llama", None, torch.bfloat16)
    ad = make_adapter(tmp_path, base, target_modules=LL + ["lm_head"], dtype=torch.bfloat16)
    _cast(ad, adapter_dtype)
    assert_peft_parity(tmp_path, base, ad, dtype=torch.bfloat16, tol=None)


# -- adapter directories -----------------------------------------------------------------------------------------------
def test_non_default_adapter_name_subfolder_and_unknown_config_fields(tmp_path, bases):
    """save_pretrained of an adapter named 'other' writes <dir>/other/; pointing at <dir> says which folder to pass.
    Newer PEFT config fields and an Unsloth-style hub id that is not available offline do not matter."""
    base = bases("llama")
    ad = make_adapter(tmp_path, base, "multi", adapter_name="other", target_modules=["q_proj", "v_proj"])
    assert ad == tmp_path / "multi" / "other"
    with pytest.raises(InputError, match=r"subfolders.*multi/other"):
        LoraAdapter.open(tmp_path / "multi")
    cfg_path = ad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    ref_cfg = dict(cfg)
    cfg.update({"base_model_name_or_path": "unsloth/llama-3-8b-Instruct-bnb-4bit", "peft_version": "9.9.9",
                "some_future_field": {"x": 1}, "another_new_flag": False})
    cfg_path.write_text(json.dumps(cfg))
    ours = tmp_path / "ours"
    merge_lora(base, ad, ours)
    cfg_path.write_text(json.dumps(ref_cfg))  # PEFT itself would reject the unknown fields
    assert_peft_parity(tmp_path, base, ad)
    a, b = _tensors(ours), _tensors(tmp_path / "merged")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_yaml_base_plus_adapter(tmp_path, bases):
    """`merge-lora` end to end (subprocess) on a tied Qwen2 with LoRA on lm_head, and the same adapter as a
    `base+adapter` reference in a merge YAML: identical tensors, both equal to PEFT."""
    base = bases("qwen2", True)
    ad = make_adapter(tmp_path, base, target_modules=["q_proj", "v_proj", "lm_head"], use_dora=True)
    res = assert_peft_parity(tmp_path, base, ad)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "merge-lora", str(base), str(ad),
                        str(tmp_path / "cli"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{ad}\n")
    merge(cfg, tmp_path / "yaml")
    for out in ("cli", "yaml"):
        got = _tensors(tmp_path / out)
        assert set(got) == set(res["tensors"]), out
        assert all(torch.equal(got[k], res["tensors"][k]) for k in got), out
        assert json.loads((tmp_path / out / "config.json").read_text())["tie_word_embeddings"] is True
