"""End-to-end engine behaviour: output layout, manifest, model card, atomicity, LoRA through the executor, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from merge_ops.api import MergeOptions, merge, merge_lora
from merge_ops.errors import ConfigError
from tests.tiny_models import load_state

CHUNKED = MergeOptions(device="cpu", chunk_elements=64, cache_bytes=0)


def ties_cfg(f):
    return {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(f["ft2"]), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def peft_reference(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


# -- output directory ------------------------------------------------------------------------------------------------

def test_output_layout_manifest_and_card(tiny_family, tmp_path):
    out = tmp_path / "merged"
    res = merge(ties_cfg(tiny_family), out, MergeOptions(device="cpu", shard_size="20KB"))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and res.shards == [s.name for s in shards]
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = load_state(out)
    assert set(index["weight_map"]) == set(merged) == set(load_state(tiny_family["base"]))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    for name, shard in index["weight_map"].items():
        from safetensors import safe_open
        with safe_open(str(out / shard), "pt") as fh:
            assert name in fh.keys()
    manifest = json.loads((out / "mergeline.json").read_text())
    for s in shards:
        assert manifest["output_shards"][s.name]["sha256"] == sha(s)
    for f, digest in manifest["input_sha256"].items():
        assert digest == sha(Path(f))
    assert str(tiny_family["ft1"] / "model.safetensors") in manifest["input_sha256"]
    assert manifest["config"]["merge_method"] == "ties" and manifest["versions"]["torch"]
    assert "cpu" in manifest["device"]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model_relation"] == "merge"
    assert front["tags"][:2] == ["merge", "mergeline"]
    assert str(tiny_family["base"]) in front["base_model"] and isinstance(front["base_model"], list)
    assert (out / "tokenizer.json").read_bytes() == (tiny_family["base"] / "tokenizer.json").read_bytes()
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 2


def test_out_dtype_and_chat_template(tiny_family, tmp_path):
    cfg = ties_cfg(tiny_family)
    cfg.update(out_dtype="float16", chat_template="chatml")
    merge(cfg, tmp_path / "o", MergeOptions(device="cpu"))
    sd = load_state(tmp_path / "o")
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float16"
    assert "<|im_start|>" in json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["chat_template"]


def test_chunked_run_equals_whole_tensor_run(tiny_family, tmp_path):
    merge(ties_cfg(tiny_family), tmp_path / "a", MergeOptions(device="cpu"))
    merge(ties_cfg(tiny_family), tmp_path / "b", CHUNKED)
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_requested_without_gpu(tiny_family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        merge(ties_cfg(tiny_family), tmp_path / "o", MergeOptions(device="cuda"))


# -- LoRA through the executor ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [MergeOptions(device="cpu"), CHUNKED], ids=["whole", "chunked"])
def test_merge_lora_matches_peft(tmp_path, options):
    from pipelines.toy_models import save_lora_adapter
    from tests.tiny_models import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base", seed=0, dtype=torch.float32)
    lora = save_lora_adapter(base, tmp_path / "lora", seed=1, r=4, alpha=16, use_rslora=True,
                             rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 3},
                             modules_to_save=["lm_head"])
    res = merge_lora(base, lora, tmp_path / "out", options)
    ours = load_state(tmp_path / "out")
    ref = peft_reference(base, lora)
    assert set(ours) == set(ref)
    changed = 0
    for k in ref:
        assert (ours[k] - ref[k]).abs().max().item() <= 1e-6, k
        changed += not torch.equal(ref[k], load_state(base)[k]) if k in load_state(base) else 0
    assert changed == 7 * 2  # 7 projections x 2 layers; the lm_head copy equals the base (untrained)
    card = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---")[1])
    assert card["base_model_relation"] == "finetune"
    assert res.tensors == len(ref)


def test_dora_embedding_needs_whole_tensor_path(tmp_path):
    from pipelines.toy_models import save_lora_adapter
    from tests.tiny_models import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base", seed=0, dtype=torch.float32)
    lora = save_lora_adapter(base, tmp_path / "lora", seed=2, r=4, alpha=8, use_dora=True,
                             targets=("q_proj", "embed_tokens"))
    merge_lora(base, lora, tmp_path / "out", CHUNKED)
    ours, ref = load_state(tmp_path / "out"), peft_reference(base, lora)
    for k in ref:
        assert (ours[k] - ref[k]).abs().max().item() <= 1e-5, k


def test_base_plus_adapter_reference_in_a_merge(tiny_family, tmp_path):
    """`base+adapter` inside a config equals merging the adapter first (no cache directory needed)."""
    f = tiny_family
    merge_lora(f["base"], f["lora"], tmp_path / "merged_lora", MergeOptions(device="cpu"))
    cfg = {"merge_method": "linear", "models": [
        {"model": f"{f['base']}+{f['lora']}", "parameters": {"weight": 0.5}},
        {"model": str(f["ft1"]), "parameters": {"weight": 0.5}}]}
    cfg2 = {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "merged_lora"), "parameters": {"weight": 0.5}},
        {"model": str(f["ft1"]), "parameters": {"weight": 0.5}}]}
    merge(cfg, tmp_path / "a", CHUNKED)
    merge(cfg2, tmp_path / "b", MergeOptions(device="cpu"))
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    # b went through a bf16 rounding of the LoRA merge first; a did not
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max().item() <= 2e-2 * (b[k].float().abs().max().item() + 1e-3), k
    assert not (tmp_path / "a" / ".cache").exists()


# -- atomicity --------------------------------------------------------------------------------------------------------

def test_failure_midway_keeps_existing_output(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    merge(ties_cfg(tiny_family), out, MergeOptions(device="cpu"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from merge_ops.methods.task_vectors import TaskVectorMethod

    calls = {"n": 0}
    original = TaskVectorMethod.apply

    def failing(self, task, chunk, stats):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return original(self, task, chunk, stats)

    monkeypatch.setattr(TaskVectorMethod, "apply", failing)
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["parameters"]["weight"] = 0.1
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(cfg, out, MergeOptions(device="cpu"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _slow_merge_cmd(f, tmp_path: Path) -> list[str]:
    cfg = {"merge_method": "della", "base_model": str(f["base"]), "models": [
        {"model": str(f["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(f["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    p = tmp_path / "slow.yml"
    p.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "pipelines.cli", "merge", str(p), str(tmp_path / "out"), "--device", "cpu",
            "--shard-size", "1MB"]


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Large enough that a merge takes a few seconds (to interrupt it midway)."""
    from tests.tiny_models import save_tiny_llama, save_variant

    root = tmp_path_factory.mktemp("big")
    base = save_tiny_llama(root / "base", seed=0, dtype=torch.bfloat16, num_layers=4, hidden=512, vocab=512,
                           tokenizer=False)
    return {"base": base, "ft1": save_variant(base, root / "ft1", seed=1), "ft2": save_variant(base, root / "ft2", seed=2)}


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killed_merge_leaves_nothing_behind(big_family, tmp_path, sig):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(_slow_merge_cmd(big_family, tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # wait until the merge is really writing (a shard file exists in the temporary directory)
    while time.time() < deadline:
        tmps = list(tmp_path.glob(".out.tmp-*"))
        if tmps and list(tmps[0].glob("model-*.safetensors")):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("merge did not start writing")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "out").exists()
    if sig == signal.SIGKILL:
        # nothing visible; the hidden temp dir of the dead process is removed by the next run
        assert all(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir() if p.name != "slow.yml")
        subprocess.run(_slow_merge_cmd(big_family, tmp_path)[:-2] + ["--dry-run"], env=env, check=True,
                       capture_output=True)
        from merge_ops.output_dir import clean_stale
        clean_stale(tmp_path / "out")
    else:
        assert "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.yml"]


# -- CLI --------------------------------------------------------------------------------------------------------------

def test_cli_merge_and_merge_lora(tiny_family, tmp_path):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(ties_cfg(tiny_family)))
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "merge", str(p), str(tmp_path / "o"), "--device", "cpu",
                        "--seed", "3", "--shard-size", "100KB"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("merged 21 tensors") and " s on cpu" in line and "peak RSS" in line
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "merge-lora", str(tiny_family["base"]),
                        str(tiny_family["lora"]), str(tmp_path / "l"), "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "l" / "mergeline.json").exists()
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "merge-lora", str(tiny_family["base"]),
                        str(tmp_path / "missing"), str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "merge", str(p), str(tmp_path / "d"), "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok: 21 output tensors") and not (tmp_path / "d").exists()


def test_hub_reference_resolves_from_local_cache(tiny_family, tmp_path, monkeypatch):
    """`org/name@revision` is read from the local Hugging Face cache (no network); a missing revision is a clear
    error that mentions --download."""
    import hashlib as _h
    import shutil

    cache = tmp_path / "hf"
    repo = cache / "models--acme--tiny-ft"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_family["ft1"].iterdir():
        digest = _h.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    importlib.import_module("merge_ops.references")
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["model"] = "acme/tiny-ft@main"
    res = merge(cfg, tmp_path / "out", MergeOptions(device="cpu"))
    manifest = res.manifest
    hashed = {Path(k).name: v for k, v in manifest["input_sha256"].items()}
    assert hashed["model.safetensors"] in {sha(tiny_family["ft1"] / "model.safetensors")}
    cfg["models"][0]["model"] = "acme/tiny-ft@v9"
    with pytest.raises(Exception, match=r"acme/tiny-ft.*revision 'v9'.*--download"):
        merge(cfg, tmp_path / "out2", MergeOptions(device="cpu"))
    assert not (tmp_path / "out2").exists()


def test_console_script_fast_exit_loses_nothing(tiny_family, tmp_path):
    """The console script (``pipelines.cli:entry``) hides scipy.linalg while numba loads and leaves with os._exit:
    its output must be byte-identical to an in-process ``main()`` run, complete (manifest, card, index), with the
    summary printed; scipy stays importable afterwards in a process that warmed up the same way."""
    import hashlib

    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(ties_cfg(tiny_family)))
    script = Path(sys.executable).parent / "mergeline"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    r = subprocess.run([str(script), "merge", str(p), str(tmp_path / "fast"), "--device", "cpu", "--seed", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("merged 21 tensors")
    from pipelines.cli import main

    assert main(["merge", str(p), str(tmp_path / "slow"), "--device", "cpu", "--seed", "3", "--no-progress"]) == 0
    digest = lambda d: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.safetensors"))}
    assert digest(tmp_path / "fast") == digest(tmp_path / "slow") and digest(tmp_path / "fast")
    for name in ("mergeline.json", "README.md", "config.json", "model.safetensors.index.json"):
        assert (tmp_path / "fast" / name).stat().st_size > 0
    assert json.loads((tmp_path / "fast" / "mergeline.json").read_text())["output_shards"]
    code = ("import sys; from merge_ops.kernels import warm_up_hiding_scipy as w; w(); "
            "a = 'scipy.linalg' in sys.modules; import scipy.linalg; print(a, scipy.linalg.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["False", "scipy.linalg"], r.stderr
