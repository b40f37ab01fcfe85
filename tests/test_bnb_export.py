"""bitsandbytes 4-bit export: the streamed output is the checkpoint transformers itself writes (same keys, dtypes,
shapes, packed bytes, quantization_config), loads with plain ``from_pretrained`` on CPU, gives the logits of
transformers' own in-memory bnb quantization of the same model, generates, and keeps peak memory flat."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_ops.bnb_export import export_bnb
from merge_ops.errors import ConfigError, MergeError
from merge_ops.fidelity import DEFAULT_PROMPTS, hf_loader, logit_fidelity
from tests.tiny_models import save_tiny_llama

pytest.importorskip("bitsandbytes")
REPO = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[1, 5, 9, 20, 33, 4, 70, 101]])


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def _transformers_quantized(base: Path, quant: str, dq: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=dq,
                           bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, device_map="cpu")


@pytest.mark.parametrize("quant,dq,tie", [("nf4", False, False), ("fp4", True, True)])
def test_export_is_what_transformers_writes_and_loads_with_its_logits(tmp_path, quant, dq, tie):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base", seed=4, dtype=torch.bfloat16, hidden=64, tie=tie)
    ref_model = _transformers_quantized(base, quant, dq)
    ref_dir = tmp_path / "hf"
    ref_model.save_pretrained(str(ref_dir))

    res = export_bnb(base, tmp_path / "ours", quant, double_quant=dq, compute_dtype="float32")
    ours, theirs = _tensors(res.path), _tensors(ref_dir)
    assert set(ours) == set(theirs)
    assert res.quantized_tensors == 14 and res.compression_ratio > 1.5
    for k, t in theirs.items():
        o = ours[k]
        assert o.dtype == t.dtype, k
        if ".quant_state.bitsandbytes__" in k:
            # same JSON; with double quant ours is padded with spaces to the length reserved in the streamed header
            assert json.loads(bytes(o.numpy())) == json.loads(bytes(t.numpy())), k
            if not dq:
                assert torch.equal(o, t), k
        else:
            assert o.shape == t.shape and torch.equal(o, t), k  # packed codes and statistics bit for bit
    cfg_ours = json.loads((res.path / "config.json").read_text())
    cfg_theirs = json.loads((ref_dir / "config.json").read_text())
    assert cfg_ours["quantization_config"] == cfg_theirs["quantization_config"]
    assert (res.path / "tokenizer.json").is_file()
    man = json.loads((res.path / "mergeline.json").read_text())
    assert man["export"]["quant"] == quant and man["export"]["sha256"] == res.sha256
    for f, s in man["output_shards"].items():
        import hashlib

        assert hashlib.sha256((res.path / f).read_bytes()).hexdigest() == s["sha256"]

    loaded = AutoModelForCausalLM.from_pretrained(str(res.path), device_map="cpu")
    q_modules = {n for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}
    assert len(q_modules) == 14 and not any("lm_head" in n or "embed" in n for n in q_modules)
    with torch.no_grad():
        a, b = loaded(IDS).logits, ref_model(IDS).logits
    assert (a - b).abs().max().item() <= 1e-6
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    gen = loaded.generate(IDS, **kw)
    assert gen.shape == (1, IDS.shape[1] + 6)
    assert torch.equal(gen, ref_model.generate(IDS, **kw))


def test_fidelity_figures(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=5, dtype=torch.float32, hidden=64)
    res = export_bnb(base, tmp_path / "nf4", "nf4")
    same = logit_fidelity(base, hf_loader(base))
    assert same["max_abs_logit_diff"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["prompts"] == len(DEFAULT_PROMPTS) and same["positions"] >= len(DEFAULT_PROMPTS)
    q = logit_fidelity(base, hf_loader(res.path), prompts=DEFAULT_PROMPTS[:3])
    assert 0.0 < q["mean_abs_logit_diff"] <= q["max_abs_logit_diff"] < 1.0
    assert 0.3 <= q["top1_agreement"] <= 1.0 and q["prompts"] == 3


def test_bad_inputs_are_clear_errors(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=6, hidden=64, tokenizer=False)
    with pytest.raises(ConfigError, match="int8"):
        export_bnb(base, tmp_path / "x", "int8")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    for f in base.iterdir():
        (gptq / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="quantized with 'gptq'.*16-bit original"):
        export_bnb(gptq, tmp_path / "y", "nf4")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export_bnb(tmp_path, capsys):
    from pipelines.cli import main

    base = save_tiny_llama(tmp_path / "base", seed=7, hidden=64, tokenizer=False)
    assert main(["export-bnb", str(base), str(tmp_path / "out"), "--quant", "fp4", "--double-quant",
                 "--no-progress"]) == 0
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is True
    assert "exported 14/21 weights to fp4" in capsys.readouterr().out
    assert main(["export-bnb", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    # merge-lora straight to a 4-bit checkpoint
    from pipelines.toy_models import save_lora_adapter

    lora = save_lora_adapter(base, tmp_path / "lora", seed=1, r=2, alpha=4, targets=("q_proj",))
    assert main(["merge-lora", str(base), str(lora), str(tmp_path / "m4"), "--out-quant", "nf4", "--no-progress",
                 "--device", "cpu"]) == 0
    man = json.loads((tmp_path / "m4" / "mergeline.json").read_text())
    assert man["kind"] == "export" and man["merge"]["kind"] == "finetune" and man["requantized"].endswith("nf4")


def test_gguf_loader_missing_file_is_a_clear_error(tmp_path):
    from merge_ops.errors import InputError
    from merge_ops.fidelity import gguf_loader

    with pytest.raises(InputError, match="does not exist"):
        gguf_loader(tmp_path / "nope.gguf")()


def test_skip_modules_stay_unquantized_and_load(tmp_path):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base", seed=8, hidden=64, tokenizer=False)
    res = export_bnb(base, tmp_path / "out", "nf4", skip_modules=["down_proj"])
    assert res.quantized_tensors == 12
    qc = json.loads((res.path / "config.json").read_text())["quantization_config"]
    # an explicit list replaces transformers' default skips, so it must name lm_head too
    assert {"down_proj", "lm_head"} <= set(qc["llm_int8_skip_modules"])
    m = AutoModelForCausalLM.from_pretrained(str(res.path), device_map="cpu")
    layer = m.model.layers[0]
    assert type(layer.mlp.down_proj) is torch.nn.Linear and isinstance(layer.mlp.up_proj, Linear4bit)
    with torch.no_grad():
        assert torch.isfinite(m(IDS).logits).all()


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from tests.tiny_models import llama_config
    root, layers = Path(sys.argv[1]), int(sys.argv[2])
    # a wide Llama written tensor by tensor (no model in memory): every layer's weights are ~4 MB in bf16
    cfg = llama_config(num_layers=layers, hidden=512, vocab=256)
    cfg.save_pretrained(str(root / "m"))
    g = torch.Generator().manual_seed(0)
    def mk(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": mk(512, 512), p + "self_attn.k_proj.weight": mk(256, 512),
             p + "self_attn.v_proj.weight": mk(256, 512), p + "self_attn.o_proj.weight": mk(512, 512),
             p + "mlp.gate_proj.weight": mk(1024, 512), p + "mlp.up_proj.weight": mk(1024, 512),
             p + "mlp.down_proj.weight": mk(512, 1024), p + "input_layernorm.weight": torch.ones(512, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(512, dtype=torch.bfloat16)}
        save_file(t, str(root / "m" / f"layer{i:03d}.safetensors"))
        del t
    save_file({"model.embed_tokens.weight": mk(256, 512), "lm_head.weight": mk(256, 512),
               "model.norm.weight": torch.ones(512, dtype=torch.bfloat16)}, str(root / "m" / "rest.safetensors"))
    from merge_ops.bnb_export import export_bnb, modules_to_quantize
    modules_to_quantize(root / "m", {})  # warm up imports and the meta model build
    import bitsandbytes.functional as F
    F.quantize_4bit(mk(1024, 512), quant_type="nf4")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = export_bnb(root / "m", root / "out", "nf4", shard_size="8MB")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grow_kib": after - before, "source_bytes": res.source_bytes, "shards": len(res.shards)}))
""")


@pytest.mark.heavy
def test_peak_rss_is_flat_in_model_size(tmp_path):
    """A 48-layer export (~200 MB of bf16 weights) raises peak RSS by about one weight's worth, not the model's."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), "48"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["source_bytes"] > 190e6 and r["shards"] > 5
    assert r["grow_kib"] * 1024 < 40e6, r  # < 40 MB growth for a 200 MB model (largest weight: 1 MB)
