"""Peak memory must not grow with model size (measured the way `/usr/bin/time -v` reports it).

Two synthetic Llama-shaped bf16 families, one 4× larger than the other (wider layers and a larger vocabulary, so the
largest single tensor grows too); the TIES merge of base + 3 fine-tunes runs as a CLI subprocess for each, and
peak RSS may differ by at most 15 %.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

pytestmark = pytest.mark.heavy


def synthetic_family(root: Path, hidden: int, vocab: int, layers: int, inter: int, count: int = 4) -> list[Path]:
    names: list[tuple[str, tuple[int, int]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden // 4, hidden)),
                  (p + "self_attn.v_proj.weight", (hidden // 4, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                  (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter)),
                  (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": inter, "dtype": "bfloat16"}
    dirs = []
    g = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in names}
    for k in range(count):
        d = root / ("base" if k == 0 else f"ft{k}")
        d.mkdir(parents=True)
        sd = base if k == 0 else {n: (t.float() + torch.randn(t.shape, generator=g) * 6e-4).to(torch.bfloat16)
                                  for n, t in base.items()}
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config))
        dirs.append(d)
        del sd
    return dirs


def peak_rss_mb(cmd: list[str]) -> float:
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs GNU time")
def test_peak_rss_is_flat_in_model_size(tmp_path):
    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    assert free_gb > 6.0, (f"test_memory writes ~5.5 GB of generated models under {tmp_path}, but only {free_gb:.1f} GB "
                           "are free there: free some disk or point pytest's --basetemp at a bigger disk")
    results = {}
    for label, dims in {"small": (1536, 12000, 4, 4096), "large": (3072, 24000, 4, 8192)}.items():
        try:  # ~5.5 GB on disk for the large family and its output: freed even when the merge fails
            dirs = synthetic_family(tmp_path / label, *dims)
            size = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
            cfg = {"merge_method": "ties", "base_model": str(dirs[0]), "dtype": "bfloat16",
                   "models": [{"model": str(d), "parameters": {"weight": 1 / 3, "density": 0.5}} for d in dirs[1:]]}
            cfg_path = tmp_path / f"{label}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            rss = peak_rss_mb([sys.executable, "-m", "pipelines.cli", "merge", str(cfg_path),
                               str(tmp_path / f"out-{label}"), "--device", "cpu"])
            results[label] = (size, rss)
        finally:
            shutil.rmtree(tmp_path / label, ignore_errors=True)
            shutil.rmtree(tmp_path / f"out-{label}", ignore_errors=True)
    (small_size, small_rss), (large_size, large_rss) = results["small"], results["large"]
    print(f"peak RSS: {small_size / 1e6:.0f} MB models -> {small_rss:.0f} MiB; "
          f"{large_size / 1e6:.0f} MB models -> {large_rss:.0f} MiB")
    assert large_size > 3.5 * small_size
    assert large_rss <= 1.15 * small_rss, results
    assert large_rss <= 1024, results


def synthetic_adapter(base: Path, out: Path, r: int, hidden: int, layers: int, inter: int) -> int:
    """A PEFT-layout LoRA (every projection of every layer, rank ``r``, random bf16 A/B) for ``synthetic_family``'s
    shapes; returns its size in bytes."""
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden // 4, hidden),
              "self_attn.v_proj": (hidden // 4, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    g = torch.Generator().manual_seed(r)
    sd = {}
    for i in range(layers):
        for mod, (o, n) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{mod}"
            sd[p + ".lora_A.weight"] = (torch.randn((r, n), generator=g) * 0.02).to(torch.bfloat16)
            sd[p + ".lora_B.weight"] = (torch.randn((o, r), generator=g) * 0.02).to(torch.bfloat16)
    out.mkdir(parents=True)
    save_file(sd, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "base_model_name_or_path": str(base),
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    return (out / "adapter_model.safetensors").stat().st_size


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs GNU time")
def test_lora_peak_rss_is_flat_in_adapter_size(tmp_path):
    """An adapter's matrices are read module by module (merge_ops.lora._Resident), not all at once: a rank-256 adapter
    (32× the bytes of a rank-8 one) must not raise the peak RSS of merge-lora by more than 15 %. Holding the whole
    rank-256 adapter as float32 (what an eager load does) would add ~110 MB here."""
    dims = dict(hidden=1536, layers=4, inter=4096)
    base = synthetic_family(tmp_path / "fam", 1536, 12000, 4, 4096, count=1)[0]
    results = {}
    for r in (8, 256):
        size = synthetic_adapter(base, tmp_path / f"lora{r}", r, **dims)
        out = tmp_path / f"out{r}"
        rss = peak_rss_mb([sys.executable, "-m", "pipelines.cli", "merge-lora", str(base), str(tmp_path / f"lora{r}"),
                           str(out), "--device", "cpu"])
        results[r] = (size, rss)
        shutil.rmtree(out)
    print(f"merge-lora peak RSS: rank 8 ({results[8][0] / 1e6:.1f} MB) -> {results[8][1]:.0f} MiB; "
          f"rank 256 ({results[256][0] / 1e6:.1f} MB) -> {results[256][1]:.0f} MiB")
    assert results[256][0] > 30 * results[8][0]
    assert results[256][1] <= 1.15 * results[8][1], results
