"""LoRA fine-tune backends (resources/training_backend.py): PEFT in-process, Unsloth in its own subprocess/venv.

Everything runs on CPU on a tiny locally generated Llama (nothing downloaded). The Unsloth test is ``heavy``: it
creates the separate Unsloth venv with scripts/install_unsloth.sh when it is missing (~2.5 min cold, ~0.1 s when
up to date) and trains through Unsloth's CPU backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.toy_models import save_tiny_llama
from resources.training_backend import (
    DEFAULT_UNSLOTH_VENV, TRAINING_LOG, DatasetError, LoraTrainConfig, TrainingError, TrainResult, load_examples,
    resolve_backend, resolve_unsloth_python, tokenize_examples, train_lora,
)

REPO = Path(__file__).resolve().parent.parent

ROWS = [
    {"text": "the quick brown fox jumps over the lazy dog"},
    {"prompt": "question: what is two plus two? answer:", "completion": " four"},
    {"text": "one two three four five six seven eight nine ten"},
    {"prompt": "def add(a, b):", "completion": " return a + b"},
    {"text": "merge models with lora adapters and task arithmetic"},
    {"prompt": "one two three", "completion": " four five six"},
]

# 12 optimizer steps at a high learning rate: the tiny random model's loss drops visibly in ~2 s
FAST = dict(max_steps=12, learning_rate=1e-2, batch_size=4, seed=0, eval_examples=16)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("train") / "base", seed=0, num_layers=2, hidden=32, vocab=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("data") / "skills.jsonl", ROWS * 3)


@pytest.fixture(scope="module")
def peft_run(base, data, tmp_path_factory) -> TrainResult:
    out = tmp_path_factory.mktemp("runs") / "adapter"
    return train_lora(base, [data], LoraTrainConfig(backend="peft", **FAST), out, device="cpu")


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapter_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# peft backend
# ---------------------------------------------------------------------------------------------------------------


def test_peft_trains_and_writes_adapter(peft_run, base, data):
    r = peft_run
    assert r.backend == "peft" and r.num_examples == len(ROWS) * 3
    assert [s for s, _ in r.losses] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in r.losses)
    first, last = r.losses[0][1], r.losses[-1][1]
    assert r.final_loss == last < first - 0.05, r.losses
    m = r.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.05
    assert m["trainable_params"] > 0 and m["steps"] == 12 and m["device"] == "cpu" and m["dtype"] == "float32"
    d = r.adapter_dir
    assert {"adapter_config.json", "adapter_model.safetensors", TRAINING_LOG} <= {p.name for p in d.iterdir()}
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and set(cfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    logrec = json.loads((d / TRAINING_LOG).read_text())
    assert logrec["backend"] == "peft" and logrec["config"]["seed"] == 0
    assert [tuple(x) for x in logrec["losses"]] == r.losses
    assert logrec["versions"]["peft"] and logrec["versions"]["transformers"] and logrec["versions"]["torch"]
    assert logrec["datasets"][0]["path"] == str(data) and len(logrec["datasets"][0]["sha256"]) == 64
    # staged atomically: nothing but the adapter dir is left beside it
    assert [p.name for p in d.parent.iterdir()] == [d.name]


def test_adapter_loads_with_peft_and_changes_logits(peft_run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 64]])
    ref = _logits(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), ids)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(peft_run.adapter_dir))
    out = _logits(model, ids)
    assert (out - ref).abs().max() > 1e-3
    sd = _adapter_tensors(peft_run.adapter_dir)
    bs = [v for k, v in sd.items() if "lora_B" in k]
    assert len(bs) == 2 * 7 and all(b.abs().max() > 0 for b in bs)  # 2 layers x 7 target modules, all trained


def test_peft_same_seed_is_bit_identical(base, data, tmp_path):
    cfg = LoraTrainConfig(backend="peft", dropout=0.1, **dict(FAST, seed=3, max_steps=6))  # dropout uses the RNG
    a = train_lora(base, [data], cfg, tmp_path / "a", device="cpu")
    b = train_lora(base, [data], cfg, tmp_path / "b", device="cpu")
    c = train_lora(base, [data], cfg.model_copy(update={"seed": 4}), tmp_path / "c", device="cpu")
    for name in ("adapter_model.safetensors", TRAINING_LOG):
        assert (a.adapter_dir / name).read_bytes() == (b.adapter_dir / name).read_bytes(), name
    assert a.losses == b.losses
    assert (a.adapter_dir / "adapter_model.safetensors").read_bytes() != \
        (c.adapter_dir / "adapter_model.safetensors").read_bytes()
    # training must not leak global state: the caller's RNG and determinism flag are as before
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    train_lora(base, [data], cfg.model_copy(update={"max_steps": 1}), tmp_path / "d", device="cpu")
    assert torch.equal(torch.rand(3), x)
    assert not torch.are_deterministic_algorithms_enabled()


def test_prompt_completion_loss_on_completion_only_and_parquet(base, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    ex = load_examples([_write_jsonl(tmp_path / "pc.jsonl", [ROWS[1], ROWS[0]])])
    (ids_pc, lab_pc), (ids_t, lab_t) = tokenize_examples(tok, ex, 128)[0]
    n_prompt = 1 + len(tok("question: what is two plus two? answer:", add_special_tokens=False)["input_ids"])
    n_comp = len(tok(" four", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert len(ids_pc) == n_prompt + n_comp
    assert lab_pc[:n_prompt] == [-100] * n_prompt and lab_pc[n_prompt:] == ids_pc[n_prompt:]
    assert ids_pc[0] == tok.bos_token_id and ids_pc[-1] == tok.eos_token_id
    assert lab_t[1:] == ids_t[1:]  # plain text: every token after BOS is a target
    # truncation that cuts off the whole completion drops the example
    rows, dropped = tokenize_examples(tok, ex, n_prompt)
    assert dropped == 1 and len(rows) == 1

    pq.write_table(pa.Table.from_pylist([ROWS[1], ROWS[3], ROWS[5]] * 2), str(tmp_path / "pc.parquet"))
    r = train_lora(base, [tmp_path / "pc.parquet"], LoraTrainConfig(backend="peft", **dict(FAST, max_steps=2)),
                   tmp_path / "out", device="cpu")
    assert r.num_examples == 6 and len(r.losses) == 2 and r.metrics["examples_dropped"] == 0


@pytest.mark.parametrize("content, match", [
    (['{"text": "ok"}', '{"text": "fine"}', '{"text": oops}'], r"bad\.jsonl:3: invalid JSON"),
    (['{"text": "ok"}', '{"prompt": "p"}'], r"bad\.jsonl:2: .*no \"completion\""),
    (['{"question": "q", "answer": "a"}'], r"bad\.jsonl:1: expected \"text\" or \"prompt\" \+ \"completion\", "
                                          r"got keys \['answer', 'question'\]"),
    (['{"text": 5}'], r"bad\.jsonl:1: \"text\" must be a string, got int"),
    (['{"text": "  "}'], r"bad\.jsonl:1: \"text\" is empty"),
    (['["a", "b"]'], r"bad\.jsonl:1: expected a JSON object"),
    (["", "  "], r"bad\.jsonl: no examples"),
])
def test_bad_dataset_rows_name_file_and_line(tmp_path, content, match):
    f = _write_jsonl(tmp_path / "bad.jsonl", content)
    with pytest.raises(DatasetError, match=match):
        load_examples([f])


def test_bad_dataset_files(tmp_path, base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(DatasetError, match=r"missing\.jsonl: dataset file not found"):
        load_examples([tmp_path / "missing.jsonl"])
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DatasetError, match=r"d\.csv: unsupported dataset format '\.csv'"):
        load_examples([tmp_path / "d.csv"])
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), str(tmp_path / "p.parquet"))
    with pytest.raises(DatasetError, match=r"p\.parquet row 1: expected \"text\""):
        load_examples([tmp_path / "p.parquet"])
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match=r"x\.parquet: not a readable parquet file"):
        load_examples([tmp_path / "x.parquet"])
    # train_lora validates the data before loading any model, and leaves nothing behind
    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', "{"])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2"):
        train_lora(base, [bad], LoraTrainConfig(backend="peft"), tmp_path / "out" / "a", device="cpu")
    assert not (tmp_path / "out" / "a").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="r"):
        LoraTrainConfig(r=0)
    with pytest.raises(ValueError, match="backend"):
        LoraTrainConfig(backend="deepspeed")
    with pytest.raises(ValueError, match="lora_rank"):
        LoraTrainConfig(lora_rank=4)  # unknown keys are errors, not silently ignored
    with pytest.raises(ValueError, match="target_modules"):
        LoraTrainConfig(target_modules=[])
    c = LoraTrainConfig.model_validate({"r": 4, "epochs": 0.5, "use_dora": True})
    assert c.alpha == 16 and c.max_steps is None and c.backend == "auto"


def test_failed_run_keeps_previous_adapter(peft_run, base, data, tmp_path):
    import shutil

    out = tmp_path / "adapter"
    shutil.copytree(peft_run.adapter_dir, out)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"match no module.*candidates: \[.*'q_proj'"):
        train_lora(base, [data], LoraTrainConfig(backend="peft", target_modules=["nope"], **FAST), out,
                   device="cpu")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging dir left
    # a successful run replaces it
    r = train_lora(base, [data], LoraTrainConfig(backend="peft", target_modules=["q_proj", "v_proj"],
                                                 **dict(FAST, max_steps=1)), out, device="cpu")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (
        ["q_proj", "v_proj"], ["v_proj", "q_proj"])
    assert r.adapter_dir == out and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_peft_4bit_without_bitsandbytes_is_a_clear_error(base, data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed in this venv")
    with pytest.raises(TrainingError, match="load_in_4bit=True needs bitsandbytes"):
        train_lora(base, [data], LoraTrainConfig(backend="peft", load_in_4bit=True, **FAST), tmp_path / "o",
                   device="cpu")


def test_backend_selection(monkeypatch, base, data, tmp_path):
    import importlib.util

    # auto: never unsloth without CUDA, and without even probing the unsloth interpreter on device=cpu
    assert resolve_backend(LoraTrainConfig(), "cpu", python="/nonexistent/python") == "peft"
    if not torch.cuda.is_available():
        assert resolve_backend(LoraTrainConfig(), "auto", python="/nonexistent/python") == "peft"
    assert resolve_backend(LoraTrainConfig(backend="unsloth"), "cpu") == "unsloth"
    # interpreter choice: explicit > $MERGELINE_UNSLOTH_PYTHON > .venv-unsloth > sys.executable
    monkeypatch.setenv("MERGELINE_UNSLOTH_PYTHON", "/opt/u/bin/python")
    assert resolve_unsloth_python("/x/python") == "/x/python"
    assert resolve_unsloth_python() == "/opt/u/bin/python"
    monkeypatch.delenv("MERGELINE_UNSLOTH_PYTHON")
    default = DEFAULT_UNSLOTH_VENV / "bin" / "python"
    assert resolve_unsloth_python() == (str(default) if default.exists() else sys.executable)
    # explicit unsloth with an interpreter that lacks it: a clear error that says how to install it
    if importlib.util.find_spec("unsloth") is None:
        with pytest.raises(TrainingError, match=r"unsloth is not importable by .*install_unsloth\.sh"):
            train_lora(base, [data], LoraTrainConfig(backend="unsloth", **FAST), tmp_path / "o", device="cpu",
                       unsloth_python=sys.executable)
        assert not (tmp_path / "o").exists()
    assert "unsloth" not in sys.modules


FAKE_UNSLOTH = """#!{python}
# stands in for an Unsloth interpreter: answers the probe, then behaves as $FAKE_MODE says
import json, os, sys, time
if sys.argv[1] == "-c":
    print(json.dumps({{"unsloth": True, "cuda": False}}))
    sys.exit(0)
args = json.load(open(sys.argv[2]))
mode = os.environ["FAKE_MODE"]
print("fake unsloth: started", args["device"], flush=True)
if mode == "hang":
    open(os.environ["FAKE_PIDFILE"], "w").write(str(os.getpid()))
    time.sleep(600)
if mode in ("error", "dataset"):
    kind = "DatasetError" if mode == "dataset" else "TrainingError"
    json.dump({{"error": {{"type": kind, "message": "x.jsonl:7: boom"}}}}, open(args["result_path"], "w"))
    sys.exit(1)
print("Traceback: something native crashed", flush=True)
sys.exit(3)
"""


@pytest.mark.parametrize("mode, exc, match", [
    ("error", TrainingError, r"x\.jsonl:7: boom \(unsloth subprocess"),
    ("dataset", DatasetError, r"^x\.jsonl:7: boom$"),
    ("crash", TrainingError, r"(?s)failed \(exit 3.*last output:.*something native crashed"),
    ("hang", TrainingError, r"exceeded timeout_s=3"),
])
def test_unsloth_subprocess_failures_are_reported_and_cleaned_up(monkeypatch, base, data, tmp_path, mode, exc,
                                                                 match):
    """The parent/child protocol, with a fake interpreter (no unsloth needed): errors cross the process boundary
    with their type, a hung child is killed at the timeout, and no staging directory is left behind."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_UNSLOTH.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_MODE", mode)
    monkeypatch.setenv("FAKE_PIDFILE", str(tmp_path / "pid"))
    lines: list[str] = []
    out = tmp_path / "out" / "adapter"
    with pytest.raises(exc, match=match):
        train_lora(base, [data], LoraTrainConfig(backend="unsloth", **FAST), out, device="cpu",
                   unsloth_python=str(fake), log=lines.append, timeout_s=3)
    assert "[unsloth] fake unsloth: started cpu" in lines
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []
    if mode == "hang":
        pid = int((tmp_path / "pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------------------------------------------------------
# unsloth backend (separate venv, subprocess, Unsloth's CPU fallback)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unsloth_py() -> str:
    """$MERGELINE_UNSLOTH_PYTHON if set; else create/update .venv-unsloth with the install script (timed)."""
    env = os.environ.get("MERGELINE_UNSLOTH_PYTHON")
    if env:
        return env
    t0 = time.perf_counter()
    cp = subprocess.run(["bash", str(REPO / "scripts" / "install_unsloth.sh"), str(DEFAULT_UNSLOTH_VENV)],
                        capture_output=True, text=True, timeout=1800)
    dt = time.perf_counter() - t0
    sys.stderr.write(f"\n[test_training] scripts/install_unsloth.sh took {dt:.1f} s\n{cp.stdout[-2000:]}\n")
    assert cp.returncode == 0, f"install_unsloth.sh failed ({dt:.0f} s):\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"
    return str(DEFAULT_UNSLOTH_VENV / "bin" / "python")


@pytest.mark.heavy
@pytest.mark.timeout(2400)
def test_unsloth_backend_trains_on_cpu_in_its_own_venv(unsloth_py, base, data, peft_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    python = unsloth_py
    lines: list[str] = []
    r = train_lora(base, [data], LoraTrainConfig(backend="unsloth", **FAST), tmp_path / "adapter", device="cpu",
                   unsloth_python=python, log=lines.append, timeout_s=900)
    out = "\n".join(lines)
    assert r.backend == "unsloth", out
    assert "Unsloth" in out and "training on CPU" in out, out  # really went through Unsloth's CPU backend
    assert "unsloth" not in sys.modules  # the parent never imported it
    losses = [v for _, v in r.losses]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05 and r.metrics["eval_loss_after"] < r.metrics["eval_loss_before"] - 0.05
    logrec = json.loads((r.adapter_dir / TRAINING_LOG).read_text())
    assert logrec["backend"] == "unsloth" and logrec["versions"]["unsloth"] and logrec["versions"]["unsloth_zoo"]
    assert logrec["versions"]["transformers"] <= "5.17.0"  # from the separate venv, not the main one
    # a real PEFT adapter: loads in THIS venv (newer transformers) and changes the logits
    sd = _adapter_tensors(r.adapter_dir)
    ref_sd = _adapter_tensors(peft_run.adapter_dir)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 64]])
    ref = _logits(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), ids)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(r.adapter_dir))
    assert (_logits(model, ids) - ref).abs().max() > 1e-3
    # Unsloth's CPU backend is stock transformers + PEFT underneath: same seed, same fp32 math -> same curve
    assert max(abs(a - b) for (_, a), (_, b) in zip(r.losses, peft_run.losses)) < 1e-3
    sys.stderr.write(f"[test_training] unsloth run: {r.seconds:.1f} s (train {r.metrics['train_seconds']} s), "
                     f"losses {losses[0]:.4f} -> {losses[-1]:.4f}\n")


@pytest.mark.heavy
@pytest.mark.timeout(2400)
def test_unsloth_backend_4bit_base_on_cpu(unsloth_py, data, tmp_path):
    """QLoRA through Unsloth's CPU backend (bitsandbytes' CPU 4-bit; layers must be >= 64 wide)."""
    base64 = save_tiny_llama(tmp_path / "base64", seed=0, num_layers=2, hidden=64, vocab=128)
    lines: list[str] = []
    r = train_lora(base64, [data], LoraTrainConfig(backend="unsloth", load_in_4bit=True, **FAST),
                   tmp_path / "adapter", device="cpu", unsloth_python=unsloth_py, log=lines.append, timeout_s=900)
    assert r.metrics["load_in_4bit"] is True, "\n".join(lines)  # really a Linear4bit base, not a 16-bit fallback
    losses = [v for _, v in r.losses]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05
    assert r.metrics["eval_loss_after"] < r.metrics["eval_loss_before"] - 0.05
    assert (r.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.heavy
@pytest.mark.timeout(2400)
def test_unsloth_errors_cross_the_process_boundary(unsloth_py, base, data, tmp_path):
    # the module form works in the Unsloth venv too (this repo is installed there editable, --no-deps)
    cp = subprocess.run([unsloth_py, "-m", "resources.unsloth_entry"], cwd="/", capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 2 and "usage: python -m resources.unsloth_entry ARGS_JSON" in cp.stderr
    with pytest.raises(TrainingError, match=r"match no module.*candidates: \[.*'q_proj'.*\(unsloth subprocess"):
        train_lora(base, [data], LoraTrainConfig(backend="unsloth", target_modules=["nope"], **FAST),
                   tmp_path / "adapter", device="cpu", unsloth_python=unsloth_py, timeout_s=900)
    assert list(tmp_path.iterdir()) == []
