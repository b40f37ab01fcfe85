"""merge_ops.lora against PEFT itself.

Why compare with ``PeftModel.from_pretrained(...).merge_and_unload()`` instead of hand-written expectations: the
engine promises PEFT's semantics, and PEFT has many quiet rules (pattern matching, Conv1D transposes, DoRA norm
axes, base-layer copies loaded before merging). Each test builds a real adapter with peft on a tiny local model,
then perturbs every saved tensor (so ``init_lora_weights``' zeros/ones and "replacement equals base" cannot hide a
bug), and checks every base tensor, whole and in row blocks, against PEFT's merged state dict.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from merge_ops.checkpoint import Checkpoint
from merge_ops.errors import InputError, UnsupportedError
import merge_ops.lora as lora_mod
from merge_ops.lora import LoraAdapter
from merge_ops.safetensors_io import read_rows
from tests.adapter_noise import perturb_adapter
from tests.tiny_models import save_tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# every test twice: default adapter-module residency and one module (tests/conftest.py::resident_modules)
pytestmark = pytest.mark.usefixtures("resident_modules")
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = 1e-6
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_MODULE_OF = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


# -- fixtures / helpers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "base", seed=1, tokenizer=False)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    """A tiny GPT-2: its attention/MLP layers are transformers' Conv1D (weights stored [in, out])."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2") / "base"
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    return path


def _model_cls(base: Path):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    return {"LlamaForCausalLM": LlamaForCausalLM, "GPT2LMHeadModel": GPT2LMHeadModel}[arch]


def make_adapter(tmp_path: Path, base: Path, name: str = "adapter", perturb: bool = True, **lora_kw) -> Path:
    """Build a real PEFT LoRA adapter on ``base`` and save it (B non-zero via init_lora_weights=False)."""
    torch.manual_seed(0)
    model = _model_cls(base).from_pretrained(str(base))
    lora_kw.setdefault("r", 4)
    lora_kw.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    out = tmp_path / name
    peft_model.save_pretrained(str(out))
    if perturb:
        perturb_adapter(out)
    return out


def peft_reference(base: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    model = _model_cls(base).from_pretrained(str(base))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_matches_peft(adapter: LoraAdapter, base_dir: Path, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every base tensor, whole and (when row-local) in two row blocks, equals PEFT's merge within TOL."""
    base = Checkpoint.open(base_dir)
    adapter.check_base(base)
    changed = set()
    diffs = {}
    for name, info in base.tensors.items():
        assert name in ref, name
        src = adapter.replacement(name) or info
        w = read_rows(src).to(torch.float32)
        out = adapter.apply(name, w)
        assert out.dtype == torch.float32 and out.shape == ref[name].shape, name
        diffs[name] = (out - ref[name].float()).abs().max().item()
        assert diffs[name] <= TOL, f"{name}: max abs diff {diffs[name]}"
        if not torch.equal(ref[name].float(), read_rows(info).float()):
            changed.add(name)
        if adapter.is_row_local(name) and w.shape[0] > 1:
            k = max(1, w.shape[0] // 3)
            blocks = [adapter.apply(name, read_rows(src, 0, k).float(), 0),
                      adapter.apply(name, read_rows(src, k, w.shape[0]).float(), row_start=k)]
            chunked = torch.cat(blocks)
            d = (chunked - ref[name].float()).abs().max().item()
            assert d <= TOL, f"{name} (row blocks 0..{k}..{w.shape[0]}): max abs diff {d}"
    # the adapter changed exactly what it says it changes (and something at all)
    assert changed, "adapter changed nothing: the test would not catch a no-op"
    assert adapter.changed_tensors() == changed
    return diffs


def llama_names(layers: int, modules: list[str]) -> set[str]:
    return {f"model.layers.{i}.{LLAMA_MODULE_OF[m]}.{m}.weight" for i in range(layers) for m in modules}


# -- features ----------------------------------------------------------------------------------------------------------
def test_plain_lora_all_linears(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=LLAMA_LINEARS)
    adapter = LoraAdapter.open(ad_dir)
    assert adapter.changed_tensors() == llama_names(2, LLAMA_LINEARS)
    assert all(adapter.is_row_local(n) for n in adapter.changed_tensors())
    assert adapter.replacement("model.layers.0.self_attn.q_proj.weight") is None
    assert adapter.scale("model.layers.0.self_attn.q_proj.weight") == pytest.approx(2.0)
    assert adapter.input_files() == [ad_dir / "adapter_config.json", ad_dir / "adapter_model.safetensors"]
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))
    # float64 rows give float64 results (the delta is computed in the caller's dtype)
    w = Checkpoint.open(llama_base).read("model.layers.0.mlp.up_proj.weight").double()
    assert adapter.apply("model.layers.0.mlp.up_proj.weight", w).dtype == torch.float64


def test_adapter_matrices_stay_few_in_memory(tmp_path, llama_base, monkeypatch, resident_modules):
    """An adapter's matrices are read when a module is used and only RESIDENT_MODULES modules keep them: opening
    the adapter checks every module (shapes, NaN/inf) without keeping them all, and a merge over every tensor never
    holds more, so peak memory does not grow with the adapter (14 modules here)."""
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=LLAMA_LINEARS)
    adapter = LoraAdapter.open(ad_dir)
    mods = list(adapter._modules.values())
    assert len(mods) == 14 > resident_modules
    resident = lambda: sum(1 for m in mods if m._arr)  # noqa: E731
    assert 1 <= resident() <= resident_modules
    peak, touch = 0, lora_mod._Resident.touch

    def spy(self, m):
        nonlocal peak
        touch(self, m)
        peak = max(peak, resident())

    monkeypatch.setattr(lora_mod._Resident, "touch", spy)
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))
    assert 1 <= peak <= resident_modules


def test_rank_and_alpha_pattern(tmp_path, llama_base):
    # "_proj" comes first and would win everywhere under substring/re.search matching; PEFT's rule (a dot-aligned
    # suffix match) never matches it. The two v_proj keys test first-match-wins in file order.
    alpha_pattern = {
        "_proj": 1000,
        "model.layers.0.self_attn.v_proj": 32,
        "v_proj": 16,
        r"layers\.1\.self_attn\.(k|o)_proj": 3,
    }
    rank_pattern = {"q_proj": 2, "layers.1.mlp.down_proj": 6}
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=LLAMA_LINEARS, rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern)
    adapter = LoraAdapter.open(ad_dir)
    s = adapter.scale
    assert s("model.layers.0.self_attn.q_proj.weight") == pytest.approx(8 / 2)
    assert s("model.layers.0.self_attn.v_proj.weight") == pytest.approx(32 / 4)
    assert s("model.layers.1.self_attn.v_proj.weight") == pytest.approx(16 / 4)
    assert s("model.layers.1.self_attn.k_proj.weight") == pytest.approx(3 / 4)
    assert s("model.layers.0.self_attn.k_proj.weight") == pytest.approx(8 / 4)
    assert s("model.layers.1.mlp.down_proj.weight") == pytest.approx(8 / 6)
    assert s("model.layers.0.mlp.down_proj.weight") == pytest.approx(8 / 4)
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))


def test_rslora(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj", "up_proj", "down_proj"], use_rslora=True,
                          rank_pattern={"up_proj": 9})
    adapter = LoraAdapter.open(ad_dir)
    assert adapter.scale("model.layers.0.self_attn.q_proj.weight") == pytest.approx(8 / 2)  # alpha / sqrt(4)
    assert adapter.scale("model.layers.1.mlp.up_proj.weight") == pytest.approx(8 / 3)  # alpha / sqrt(9)
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))


@pytest.mark.parametrize("flag_in_config", [True, False])
def test_fan_in_fan_out_conv1d_with_biases(tmp_path, gpt2_base, flag_in_config):
    """GPT-2 Conv1D weights are [in, out]: the delta is transposed. Also lora_bias (b += s·lora_B.bias) on top of
    bias="all" replacements. With flag_in_config=False the saved config lies (PEFT fixes fan_in_fan_out per module
    class at load time); the square attn.c_proj must still be treated as Conv1D."""
    ad_dir = make_adapter(tmp_path, gpt2_base, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                          lora_bias=True, bias="all")
    if not flag_in_config:
        cfg_path = ad_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["fan_in_fan_out"] = False
        cfg_path.write_text(json.dumps(cfg))
    adapter = LoraAdapter.open(ad_dir)
    assert "transformer.h.0.attn.c_attn.bias" in adapter.changed_tensors()
    assert adapter.replacement("transformer.h.0.attn.c_attn.bias") is not None  # from ...c_attn.base_layer.bias
    assert adapter.replacement("transformer.ln_f.bias") is not None
    assert_matches_peft(adapter, gpt2_base, peft_reference(gpt2_base, ad_dir))


def test_embedding_lora(tmp_path, llama_base):
    """lora_embedding_A/B; PEFT also saves embed_tokens.base_layer.weight, loaded before merging: the LoRA update
    must apply on top of that copy (perturbed here so it differs from the base)."""
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["embed_tokens", "q_proj"])
    adapter = LoraAdapter.open(ad_dir)
    rep = adapter.replacement("model.embed_tokens.weight")
    assert rep is not None and rep.name == "base_model.model.model.embed_tokens.base_layer.weight"
    assert adapter.is_row_local("model.embed_tokens.weight")
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))


def test_dora_linear(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                          use_dora=True)
    adapter = LoraAdapter.open(ad_dir)
    # nn.Linear DoRA normalises each output row: row blocks can be merged independently
    assert all(adapter.is_row_local(n) for n in adapter.changed_tensors())
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))


def test_dora_embedding_and_lm_head(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["embed_tokens", "lm_head"], use_dora=True)
    adapter = LoraAdapter.open(ad_dir)
    # embedding DoRA normalises each embedding dimension over the whole vocabulary (a column of the stored tensor)
    assert not adapter.is_row_local("model.embed_tokens.weight")
    assert adapter.is_row_local("lm_head.weight")
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))
    w = Checkpoint.open(llama_base).read("model.embed_tokens.weight").float()
    with pytest.raises(ValueError, match="whole tensor"):
        adapter.apply("model.embed_tokens.weight", w[:10])


def test_dora_conv1d(tmp_path, gpt2_base):
    ad_dir = make_adapter(tmp_path, gpt2_base, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          use_dora=True)
    adapter = LoraAdapter.open(ad_dir)
    adapter.check_base(Checkpoint.open(gpt2_base))
    assert not adapter.is_row_local("transformer.h.0.attn.c_attn.weight")  # norm down the stored [in, out] columns
    assert not adapter.is_row_local("transformer.h.1.attn.c_proj.weight")  # square: layout from config/siblings
    assert_matches_peft(adapter, gpt2_base, peft_reference(gpt2_base, ad_dir))


def test_modules_to_save(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = LoraAdapter.open(ad_dir)
    rep = adapter.replacement("lm_head.weight")
    assert rep is not None and rep.name == "base_model.model.lm_head.weight" and rep.shape == (128, 32)
    assert "lm_head.weight" in adapter.changed_tensors()
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))


def test_keys_with_adapter_name(tmp_path, llama_base):
    """Files written by other tools keep PEFT's adapter name in keys (lora_A.default.weight): same merge."""
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=True)
    ref = peft_reference(llama_base, ad_dir)
    f = ad_dir / "adapter_model.safetensors"
    sd = load_file(str(f))
    renamed = {}
    for k, v in sd.items():
        for kind in ("lora_A", "lora_B"):
            k = k.replace(f".{kind}.weight", f".{kind}.default.weight")
        for kind in ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B"):
            if k.endswith(kind):
                k += ".default"
        renamed[k] = v
    assert any(".default" in k for k in renamed) and set(renamed) != set(sd)
    save_file(renamed, str(f))
    assert_matches_peft(LoraAdapter.open(ad_dir), llama_base, ref)


def test_pickled_adapter_needs_allow_pickle(tmp_path, llama_base):
    torch.manual_seed(0)
    model = _model_cls(llama_base).from_pretrained(str(llama_base))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False))
    ad_dir = tmp_path / "pickled"
    pm.save_pretrained(str(ad_dir), safe_serialization=False)
    assert (ad_dir / "adapter_model.bin").is_file() and not (ad_dir / "adapter_model.safetensors").exists()
    with pytest.raises(InputError, match="--allow-pickle") as ei:
        LoraAdapter.open(ad_dir)
    assert str(ad_dir) in str(ei.value)
    adapter = LoraAdapter.open(ad_dir, allow_pickle=True)
    assert adapter.input_files() == [ad_dir / "adapter_config.json", ad_dir / "adapter_model.bin"]
    assert_matches_peft(adapter, llama_base, peft_reference(llama_base, ad_dir))


# -- errors ------------------------------------------------------------------------------------------------------------
def test_adapter_for_another_base(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj", "v_proj"], perturb=False)
    other = save_tiny_llama(tmp_path / "wide", seed=3, hidden=48, tokenizer=False)
    adapter = LoraAdapter.open(ad_dir)
    with pytest.raises(InputError) as ei:
        adapter.check_base(Checkpoint.open(other))
    msg = str(ei.value)
    assert "model.layers.0.self_attn.q_proj.weight" in msg and str(ad_dir) in msg and "[48, 48]" in msg
    # a base lacking the targeted tensor altogether
    one_layer = save_tiny_llama(tmp_path / "one", seed=3, num_layers=1, tokenizer=False)
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.(q|v)_proj\.weight"):
        adapter.check_base(Checkpoint.open(one_layer))


def test_missing_config_and_weights(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj"], perturb=False)
    (ad_dir / "adapter_config.json").unlink()
    with pytest.raises(InputError, match="adapter_config.json"):
        LoraAdapter.open(ad_dir)
    with pytest.raises(InputError, match="does not exist"):
        LoraAdapter.open(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(InputError, match="no weights"):
        LoraAdapter.open(empty)


def test_not_lora_or_unsupported_config(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj"], perturb=False)
    cfg_path = ad_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(UnsupportedError, match="IA3"):
        LoraAdapter.open(ad_dir)
    cfg_path.write_text(json.dumps({**cfg, "layer_replication": [[0, 2], [1, 2]]}))
    with pytest.raises(UnsupportedError, match="layer_replication"):
        LoraAdapter.open(ad_dir)
    cfg_path.write_text(json.dumps(cfg))
    LoraAdapter.open(ad_dir)  # the untouched config is fine


def test_broken_adapter_files(tmp_path, llama_base):
    ad_dir = make_adapter(tmp_path, llama_base, target_modules=["q_proj"], perturb=False)
    f = ad_dir / "adapter_model.safetensors"
    sd = load_file(str(f))
    b_key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    a_key = b_key.replace("lora_B", "lora_A")

    save_file({k: v for k, v in sd.items() if k != b_key}, str(f))
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.q_proj.*no lora_B"):
        LoraAdapter.open(ad_dir)

    save_file({**sd, b_key: torch.zeros(32, 3)}, str(f))
    with pytest.raises(InputError, match="rank mismatch"):
        LoraAdapter.open(ad_dir)

    odd = "base_model.model.model.layers.0.self_attn.q_proj.lora_E.weight"
    save_file({**sd, odd: torch.zeros(4)}, str(f))
    with pytest.raises(UnsupportedError, match="lora_E"):
        LoraAdapter.open(ad_dir)

    tok = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    save_file({**sd, tok: torch.zeros(2, 32)}, str(f))
    with pytest.raises(UnsupportedError, match="trainable_token"):
        LoraAdapter.open(ad_dir)

    save_file({**sd, a_key.replace("lora_A.weight", "lora_A.other.weight"): sd[a_key].clone()}, str(f))
    with pytest.raises(InputError, match="two"):
        LoraAdapter.open(ad_dir)
