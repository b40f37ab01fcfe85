"""LoRA fine-tuning backends for mergeline: transformers + PEFT in-process, or Unsloth in its own subprocess.

Framework-free (no Dagster import); the fine-tune asset calls :func:`train_lora`.

* ``peft``    -- transformers + PEFT and a plain torch training loop (AdamW, no HF Trainer), seeded and with
                 ``torch.use_deterministic_algorithms``: on CPU the same seed gives a bit-identical adapter.
* ``unsloth`` -- ``FastLanguageModel.from_pretrained`` / ``get_peft_model`` and the same training loop, run in a
                 subprocess (``resources/unsloth_entry.py``) because ``import unsloth`` must precede transformers /
                 peft / trl in its process and patches them. This process never imports unsloth. The subprocess
                 interpreter is ``unsloth_python=`` / ``$MERGELINE_UNSLOTH_PYTHON`` / ``<repo>/.venv-unsloth/bin/python``
                 (when it exists) / ``sys.executable``, so Unsloth can live in a separate venv whose pins
                 (transformers <= 5.17, datasets < 5, trl <= 1.15) do not fight the main one
                 (``scripts/install_unsloth.sh``). Without a GPU Unsloth trains on its CPU backend.
* ``auto``    -- ``unsloth`` when CUDA is available here AND in the Unsloth interpreter AND unsloth is importable
                 there; ``peft`` otherwise.

Datasets: ``.jsonl`` / ``.json`` / ``.parquet`` rows of ``{"text": ...}`` (loss on every token) or
``{"prompt": ..., "completion": ...}`` (loss on the completion tokens only). A bad row raises
:class:`DatasetError` naming the file and line / row.

Output (``out_dir``, written atomically: a temp dir beside it, then a rename): a PEFT adapter directory
(``adapter_config.json``, ``adapter_model.safetensors``) plus ``training_log.json`` (per-step losses, config,
backend, device, dataset hashes, library versions). ``training_log.json`` holds no timings, so the whole directory
is a deterministic function of (base, data, config, seed, versions) on CPU; timings are in :class:`TrainResult`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "LoraTrainConfig", "TrainResult", "train_lora", "TrainingError", "DatasetError", "Example", "load_examples",
    "resolve_backend", "resolve_unsloth_python", "unsloth_available", "DEFAULT_TARGET_MODULES", "TRAINING_LOG",
]

log_ = logging.getLogger("mergeline.training")

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINING_LOG = "training_log.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPT = Path(__file__).resolve().with_name("unsloth_entry.py")
UNSLOTH_PYTHON_ENV = "MERGELINE_UNSLOTH_PYTHON"
DEFAULT_UNSLOTH_VENV = REPO_ROOT / ".venv-unsloth"
IGNORE_INDEX = -100


class TrainingError(RuntimeError):
    """A fine-tune could not run (bad config for this machine, missing optional dependency, failed subprocess)."""


class DatasetError(ValueError):
    """A dataset file or row is unusable; the message names the file and the line (jsonl) or row (parquet)."""


# ---------------------------------------------------------------------------------------------------------------
# config / result
# ---------------------------------------------------------------------------------------------------------------


class LoraTrainConfig(BaseModel):
    """LoRA hyper-parameters and training settings (the fine-tune section of a pipeline)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)
    use_rslora: bool = False
    use_dora: bool = False
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)  # wins over epochs when set (as in HF TrainingArguments)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    max_seq_len: int = Field(128, ge=2)
    seed: int = 0
    load_in_4bit: bool = False
    backend: Literal["auto", "unsloth", "peft"] = "auto"
    # --- extras (defaults keep the interface above unchanged) ---
    grad_accum_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_examples: int = Field(64, ge=0)  # loss on the first N examples before and after training (0: off)

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if any(not isinstance(t, str) or not t.strip() for t in v):
            raise ValueError("target_modules must be non-empty module names such as 'q_proj'")
        return v

    @model_validator(mode="after")
    def _check(self) -> "LoraTrainConfig":
        if self.use_dora and self.load_in_4bit and self.backend == "unsloth":
            raise ValueError("use_dora with load_in_4bit is not supported by the unsloth backend")
        return self


class TrainResult(BaseModel):
    """What :func:`train_lora` produced. ``losses`` are (optimizer step, training loss) pairs, steps from 1."""

    adapter_dir: Path
    backend: str
    losses: list[tuple[int, float]]
    final_loss: float
    seconds: float
    num_examples: int
    metrics: dict


# ---------------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One training example: ``prompt`` is None for plain text (loss on all tokens)."""

    text: str
    prompt: str | None = None
    source: str = ""  # "file:line" for error messages


def _row_to_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object with \"text\" or \"prompt\" + \"completion\", "
                           f"got {type(row).__name__}")
    if "text" in row and row["text"] is not None:
        text = row["text"]
        if not isinstance(text, str):
            raise DatasetError(f"{where}: \"text\" must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DatasetError(f"{where}: \"text\" is empty")
        return Example(text=text, source=where)
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        for key, val in (("prompt", prompt), ("completion", completion)):
            if val is None:
                raise DatasetError(f"{where}: has \"{'prompt' if key == 'completion' else 'completion'}\" but no "
                                   f"\"{key}\" (rows need \"text\", or both \"prompt\" and \"completion\")")
            if not isinstance(val, str):
                raise DatasetError(f"{where}: \"{key}\" must be a string, got {type(val).__name__}")
        if not completion.strip():
            raise DatasetError(f"{where}: \"completion\" is empty")
        return Example(text=completion, prompt=prompt, source=where)
    keys = sorted(row)
    raise DatasetError(f"{where}: expected \"text\" or \"prompt\" + \"completion\", got keys {keys}")


def _read_parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with datasets
        raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.read_table(str(path))
    except Exception as e:
        raise DatasetError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    return table.to_pylist()


def load_examples(dataset_files: list[Path] | list[str]) -> list[Example]:
    """Parse every dataset file into :class:`Example` s (no tokenizer needed); raises :class:`DatasetError`."""
    if not dataset_files:
        raise DatasetError("no dataset files given")
    out: list[Example] = []
    for f in dataset_files:
        path = Path(f)
        if not path.is_file():
            raise DatasetError(f"{path}: dataset file not found")
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        n_before = len(out)
        if suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                    out.append(_row_to_example(row, f"{path}:{lineno}"))
        elif suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise DatasetError(f"{path}: a .json dataset must be a list of objects (use .jsonl for one per line)")
            out.extend(_row_to_example(r, f"{path}[{i}]") for i, r in enumerate(rows))
        elif suffix == ".parquet":
            out.extend(_row_to_example(r, f"{path} row {i}") for i, r in enumerate(_read_parquet_rows(path)))
        else:
            raise DatasetError(f"{path}: unsupported dataset format {path.suffix!r} (use .jsonl, .json or .parquet)")
        if len(out) == n_before:
            raise DatasetError(f"{path}: no examples")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# backend / device / interpreter selection
# ---------------------------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    import torch

    d = (device or "auto").strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return "cpu"
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device={device!r} but CUDA is not available here (torch {torch.__version__}); "
                                "use device='cpu' or 'auto'")
        return d
    raise TrainingError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def resolve_unsloth_python(explicit: str | os.PathLike | None = None) -> str:
    """The interpreter for the Unsloth subprocess: explicit > $MERGELINE_UNSLOTH_PYTHON > .venv-unsloth > this one."""
    if explicit:
        return str(explicit)
    env = os.environ.get(UNSLOTH_PYTHON_ENV, "").strip()
    if env:
        return env
    cand = DEFAULT_UNSLOTH_VENV / "bin" / "python"
    if cand.exists():
        return str(cand)
    return sys.executable


_PROBE = r"""
import importlib.util, json, sys
info = {"unsloth": importlib.util.find_spec("unsloth") is not None, "python": sys.version.split()[0]}
if "--cuda" in sys.argv:
    try:
        import torch
        info["cuda"] = bool(torch.cuda.is_available())
        info["torch"] = torch.__version__
    except Exception as e:  # torch missing or broken
        info["cuda"] = False
        info["torch_error"] = repr(e)
print(json.dumps(info))
"""


_PROBE_CACHE: dict[tuple[str, bool], dict] = {}


def _probe(python: str, cuda: bool) -> dict:
    """Run the probe in ``python``; positive answers are cached (a later install is seen without a restart)."""
    key = (python, cuda)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    info = _probe_uncached(python, cuda)
    if info.get("unsloth") and (not cuda or "cuda" in info):
        _PROBE_CACHE[key] = info
    return info


def _probe_uncached(python: str, cuda: bool) -> dict:
    try:
        cp = subprocess.run([python, "-c", _PROBE] + (["--cuda"] if cuda else []), capture_output=True, text=True,
                            timeout=120, env=_child_env(None))
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"unsloth": False, "error": f"{type(e).__name__}: {e}"}
    if cp.returncode != 0:
        return {"unsloth": False, "error": (cp.stderr or cp.stdout).strip()[-500:]}
    try:
        return json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"unsloth": False, "error": f"unexpected probe output: {cp.stdout[-200:]!r}"}


def unsloth_available(python: str | None = None, *, need_cuda: bool = False) -> bool:
    """Cheap check in a subprocess (``find_spec``, plus ``torch.cuda.is_available()`` when ``need_cuda``)."""
    info = _probe(resolve_unsloth_python(python), need_cuda)
    return bool(info.get("unsloth")) and (not need_cuda or bool(info.get("cuda")))


def resolve_backend(cfg: LoraTrainConfig, device: str = "auto", *, python: str | None = None) -> str:
    """'peft' or 'unsloth' for this config on this machine (``auto``: unsloth only with CUDA + unsloth installed)."""
    if cfg.backend != "auto":
        return cfg.backend
    if (device or "auto").strip().lower() == "cpu":
        return "peft"
    import torch

    if not torch.cuda.is_available():
        return "peft"
    return "unsloth" if unsloth_available(python, need_cuda=True) else "peft"


# ---------------------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------------------


def train_lora(base_dir: Path, dataset_files: list[Path], cfg: LoraTrainConfig, out_dir: Path, *,
               device: str = "auto", unsloth_python: str | os.PathLike | None = None,
               log: Callable[[str], None] | None = None, timeout_s: float | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter of the causal LM in ``base_dir`` on ``dataset_files``; write it to ``out_dir``.

    ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``. ``unsloth_python``: interpreter for the Unsloth
    subprocess (default: see :func:`resolve_unsloth_python`). ``log``: receives progress lines (default: the
    ``mergeline.training`` logger). ``timeout_s``: kill the Unsloth subprocess after this many seconds.
    An existing ``out_dir`` is replaced only once the new adapter is complete.
    """
    t0 = time.perf_counter()
    # absolute (not symlink-resolved) paths: they are recorded in adapter_config.json / training_log.json and the
    # Unsloth subprocess runs in another working directory
    base_dir, out_dir = Path(base_dir).absolute(), Path(out_dir).absolute()
    dataset_files = [Path(f).absolute() for f in dataset_files]
    emit = log or log_.info
    if not isinstance(cfg, LoraTrainConfig):
        cfg = LoraTrainConfig.model_validate(cfg)
    if not (base_dir / "config.json").is_file():
        raise TrainingError(f"{base_dir}: not a Hugging Face model directory (no config.json)")
    examples = load_examples(dataset_files)  # fail fast on bad data, before any model is loaded
    python = resolve_unsloth_python(unsloth_python)
    backend = resolve_backend(cfg, device, python=python)
    emit(f"fine-tune: backend={backend} (requested {cfg.backend}), {len(examples)} examples from "
         f"{len(dataset_files)} file(s), base {base_dir}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if backend == "peft":
            res = _train_in_process(base_dir, dataset_files, examples, cfg, stage, device=device, emit=emit)
        else:
            res = _train_unsloth_subprocess(base_dir, dataset_files, cfg, stage, device=device, python=python,
                                            emit=emit, timeout_s=timeout_s)
        _replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    metrics = dict(res["metrics"], seconds_total=round(seconds, 3))
    return TrainResult(adapter_dir=out_dir, backend=backend, losses=[(int(s), float(v)) for s, v in res["losses"]],
                       final_loss=float(res["final_loss"]), seconds=seconds, num_examples=int(res["num_examples"]),
                       metrics=metrics)


def _replace_dir(stage: Path, out_dir: Path) -> None:
    """Move the finished ``stage`` dir to ``out_dir``; an old ``out_dir`` is removed only after the swap."""
    if out_dir.exists() or out_dir.is_symlink():
        trash = out_dir.parent / f".{out_dir.name}.tmp-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, trash)
        try:
            os.replace(stage, out_dir)
        except BaseException:
            os.replace(trash, out_dir)
            raise
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(stage, out_dir)


# ---------------------------------------------------------------------------------------------------------------
# Unsloth subprocess (parent side)
# ---------------------------------------------------------------------------------------------------------------


def _child_env(device: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no phone-home to the Hub from unsloth's import
    env.setdefault("HF_HUB_OFFLINE", "1")  # base models are local directories
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also silences transformers' "Loading weights" bars
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["UNSLOTH_FORCE_CPU"] = "1"
    elif device and device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


def _train_unsloth_subprocess(base_dir: Path, dataset_files: list[Path], cfg: LoraTrainConfig, stage: Path, *,
                              device: str, python: str, emit: Callable[[str], None],
                              timeout_s: float | None) -> dict:
    info = _probe(python, False)
    if not info.get("unsloth"):
        why = f" ({info['error']})" if info.get("error") else ""
        raise TrainingError(
            f"backend='unsloth' but unsloth is not importable by {python}{why}. Install the optional Unsloth venv "
            f"with `scripts/install_unsloth.sh` (creates {DEFAULT_UNSLOTH_VENV}), or point ${UNSLOTH_PYTHON_ENV} at "
            "an interpreter that has unsloth; or use backend='peft'.")
    d = (device or "auto").strip().lower()
    if d not in ("auto", "cpu", "cuda") and not d.startswith("cuda:"):
        raise TrainingError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    child_device = "cpu" if d == "cpu" else ("cuda" if d.startswith("cuda") else "auto")
    with tempfile.TemporaryDirectory(prefix="mergeline-unsloth-") as tmp:
        args_path, result_path = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_path.write_text(json.dumps({
            "base_dir": str(base_dir), "dataset_files": [str(f) for f in dataset_files],
            "cfg": cfg.model_dump(mode="json"), "out_dir": str(stage.absolute()), "device": child_device,
            "result_path": str(result_path),
        }))
        cmd = [python, str(ENTRY_SCRIPT), str(args_path)]
        emit(f"fine-tune: starting unsloth subprocess: {' '.join(cmd)}")
        rc, tail = _run_streaming(cmd, env=_child_env(d), emit=emit, timeout_s=timeout_s)
        result = None
        if result_path.is_file():
            with contextlib.suppress(ValueError):
                result = json.loads(result_path.read_text())
        if result and "error" in result:
            err = result["error"]
            cls = {"DatasetError": DatasetError}.get(err.get("type"), TrainingError)
            raise cls(f"{err.get('message')}" + ("" if cls is DatasetError else f" (unsloth subprocess, {python})"))
        if rc != 0 or not result:
            raise TrainingError(f"unsloth subprocess failed (exit {rc}, {python}); last output:\n" + "\n".join(tail))
    if not (stage / "adapter_config.json").is_file():
        raise TrainingError(f"unsloth subprocess reported success but wrote no adapter to {stage}")
    return result


def _run_streaming(cmd: list[str], *, env: dict, emit: Callable[[str], None],
                   timeout_s: float | None) -> tuple[int, deque]:
    """Run ``cmd`` in its own process group; its output lines go to ``emit`` from THIS thread (loggers such as
    Dagster's need not be thread-safe). Timeout, Ctrl-C or any error kill the whole group."""
    import queue
    import threading

    tail: deque[str] = deque(maxlen=60)
    lines: queue.Queue = queue.Queue()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", bufsize=1, env=env, cwd=str(REPO_ROOT),
                            start_new_session=True)

    def pump():
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="unsloth-output", daemon=True)
    reader.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            for part in line.replace("\r", "\n").splitlines():  # tqdm bars redraw with \r
                if part.strip():
                    tail.append(part)
                    emit(f"[unsloth] {part}")
            if deadline is not None and time.monotonic() > deadline:
                raise TrainingError(f"unsloth subprocess exceeded timeout_s={timeout_s}; killed. Last output:\n"
                                    + "\n".join(tail))
        rc = proc.wait()
    except BaseException:
        _kill(proc)
        raise
    finally:
        reader.join(timeout=5)
    return rc, tail


def _kill(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# shared training core (peft in-process; also run by unsloth_entry inside the Unsloth subprocess)
# ---------------------------------------------------------------------------------------------------------------


def _versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "bitsandbytes") + extra:
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


@contextlib.contextmanager
def _deterministic(seed: int, device: str):
    """Seed every RNG and switch on deterministic algorithms; restore the global torch state afterwards."""
    import random

    import torch

    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    py_state = random.getstate()
    np_state = None
    with contextlib.suppress(ImportError):
        import numpy as np

        np_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            random.seed(seed)
            if np_state is not None:
                import numpy as np

                np.random.seed(seed % (2 ** 32))
            torch.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed_all(seed)
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            yield
        finally:
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn
            random.setstate(py_state)
            if np_state is not None:
                import numpy as np

                np.random.set_state(np_state)


def _load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as e:
        raise TrainingError(f"{base_dir}: cannot load a tokenizer ({type(e).__name__}: {e}); the base model "
                            "directory must contain its tokenizer files") from e
    return tok


def _pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenize_examples(tok, examples: list[Example], max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(input_ids, labels) per example and the number dropped for having no trainable token after truncation.

    BOS is prepended when the tokenizer has one and did not add it; EOS is appended so the model learns to stop.
    Prompt and completion are tokenized separately and concatenated; prompt labels are -100 (ignored).
    """
    bos, eos = tok.bos_token_id, tok.eos_token_id

    def enc(s: str) -> list[int]:
        return list(tok(s, add_special_tokens=False)["input_ids"])

    out, dropped = [], 0
    for ex in examples:
        head = [bos] if bos is not None else []
        if ex.prompt is None:
            body = enc(ex.text) + ([eos] if eos is not None else [])
            ids = head + body
            labels = list(ids)
            if head:
                labels[0] = IGNORE_INDEX  # never a target anyway (shifted away); keep it out of the count
        else:
            p = head + enc(ex.prompt)
            c = enc(ex.text) + ([eos] if eos is not None else [])
            ids = p + c
            labels = [IGNORE_INDEX] * len(p) + c
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        # a label at position 0 is never predicted (causal shift): need one at position >= 1
        if len(ids) < 2 or all(t == IGNORE_INDEX for t in labels[1:]):
            dropped += 1
            continue
        out.append((ids, labels))
    return out, dropped


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def _lr_at(step: int, total: int, cfg: LoraTrainConfig) -> float:
    """Learning-rate multiplier for 0-based optimizer step ``step``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_scheduler == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_scheduler == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def _eval_loss(model, rows, pad_id: int, batch_size: int, device) -> float | None:
    """Mean token loss over ``rows`` (eval mode, no grad): sum over batches of loss x predicted tokens / tokens."""
    import torch

    if not rows:
        return None
    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids, mask, labels = (t.to(device) for t in _collate(rows[i: i + batch_size], pad_id))
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            tot += float(loss) * k
            n += k
    if was_training:
        model.train()
    return tot / max(1, n)


def _train_loop(model, tok, examples: list[Example], cfg: LoraTrainConfig, device: str,
                emit: Callable[[str], None], autocast_dtype=None) -> dict:
    """Tokenize, train with AdamW for the configured steps, return losses and metrics (no saving)."""
    import torch

    rows, dropped = tokenize_examples(tok, examples, cfg.max_seq_len)
    if not rows:
        raise DatasetError(f"no example has a trainable token within max_seq_len={cfg.max_seq_len} "
                           f"({len(examples)} examples, all dropped)")
    if dropped:
        emit(f"fine-tune: dropped {dropped} example(s) with no completion token within max_seq_len={cfg.max_seq_len}")
    pad_id = _pad_id(tok)
    n = len(rows)
    batches_per_epoch = math.ceil(n / cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum_steps)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters (LoRA targets matched nothing?)")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, total, cfg))
    eval_rows = rows[: cfg.eval_examples]
    eval_before = _eval_loss(model, eval_rows, pad_id, cfg.batch_size, device)

    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    epoch = 0

    def next_batch():
        nonlocal order, epoch
        if not order:
            order = torch.randperm(n, generator=gen).tolist()
            epoch += 1
        take, order = order[: cfg.batch_size], order[cfg.batch_size:]
        return [rows[i] for i in take]

    model.train()
    losses: list[tuple[int, float]] = []
    tokens = 0
    every = max(1, total // 20)
    t0 = time.perf_counter()
    for step in range(total):
        opt.zero_grad(set_to_none=True)
        acc = 0.0
        for _ in range(cfg.grad_accum_steps):
            ids, mask, labels = (t.to(device) for t in _collate(next_batch(), pad_id))
            tokens += int(mask.sum())
            ctx = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                   if autocast_dtype is not None else contextlib.nullcontext())
            with ctx:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if not torch.isfinite(loss.detach()):
                raise TrainingError(f"loss is {float(loss.detach())} at step {step + 1}; lower learning_rate "
                                    f"(now {cfg.learning_rate}) or check the data")
            (loss / cfg.grad_accum_steps).backward()
            acc += float(loss.detach()) / cfg.grad_accum_steps
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append((step + 1, acc))
        if (step + 1) % every == 0 or step + 1 == total:
            emit(f"fine-tune: step {step + 1}/{total} loss {acc:.4f} lr {sched.get_last_lr()[0]:.3g}")
    train_s = time.perf_counter() - t0
    eval_after = _eval_loss(model, eval_rows, pad_id, cfg.batch_size, device)
    trainable = sum(p.numel() for p in params)
    total_params = sum(p.numel() for p in model.parameters())
    tail = [v for _, v in losses[-max(1, len(losses) // 10):]]
    metrics = {
        "steps": total, "epochs": round(total * cfg.grad_accum_steps * cfg.batch_size / n, 4),
        "examples_used": n, "examples_dropped": dropped, "tokens_seen": tokens,
        "initial_loss": losses[0][1], "final_loss": losses[-1][1], "min_loss": min(v for _, v in losses),
        "final_loss_avg": sum(tail) / len(tail),
        "eval_examples": len(eval_rows), "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "trainable_params": trainable, "total_params": total_params,
        "train_seconds": round(train_s, 3), "tokens_per_second": round(tokens / train_s, 1) if train_s > 0 else None,
        "device": str(device),
    }
    return {"losses": losses, "metrics": metrics}


def _check_targets(model, targets: list[str]) -> list[str]:
    """Targets that match no module; raise when none matches (PEFT's own error does not list the candidates)."""
    import torch

    leaf = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear,))}
    leaf |= {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Embedding")}
    missing = [t for t in targets if t not in leaf]
    if len(missing) == len(targets):
        raise TrainingError(f"target_modules {targets} match no module of this model; candidates: {sorted(leaf)}")
    return missing


def _write_outputs(model, out_dir: Path, *, backend: str, cfg: LoraTrainConfig, base_dir: Path,
                   dataset_files: list[Path], num_examples: int, train: dict, extra: dict) -> dict:
    """save_pretrained the adapter into ``out_dir`` and write training_log.json; returns the result dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if not (out_dir / "adapter_config.json").is_file():
        raise TrainingError(f"save_pretrained wrote no adapter_config.json to {out_dir}")
    # PEFT stores target_modules as a set, so its order (and the file's bytes) change from process to process;
    # sort it so the same training run gives the same bytes (and the same content hash / data version)
    conf_path = out_dir / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    if isinstance(conf.get("target_modules"), list):
        conf["target_modules"] = sorted(conf["target_modules"])
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    metrics = dict(train["metrics"], **extra)
    final_loss = train["losses"][-1][1]
    deterministic_metrics = {k: v for k, v in metrics.items()
                             if k not in ("train_seconds", "tokens_per_second", "seconds_total")}
    record = {
        "backend": backend,
        "base_model": str(base_dir),
        "datasets": [{"path": str(f), "sha256": _sha256(f)} for f in dataset_files],
        "num_examples": num_examples,
        "config": cfg.model_dump(mode="json"),
        "losses": [[s, v] for s, v in train["losses"]],
        "final_loss": final_loss,
        "metrics": deterministic_metrics,
        "versions": metrics.get("versions", {}),
    }
    (out_dir / TRAINING_LOG).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return {"losses": train["losses"], "final_loss": final_loss, "num_examples": num_examples, "metrics": metrics}


def _train_in_process(base_dir: Path, dataset_files: list[Path], examples: list[Example], cfg: LoraTrainConfig,
                      stage: Path, *, device: str, emit: Callable[[str], None]) -> dict:
    """The ``peft`` backend: transformers + PEFT, deterministic torch loop."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    dev = _resolve_device(device)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    use_bf16 = dev.startswith("cuda") and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    kw: dict[str, Any] = {}
    if cfg.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError("load_in_4bit=True needs bitsandbytes (`pip install bitsandbytes`; on CPU it needs "
                                "bitsandbytes >= 0.48 with its CPU backend), or set load_in_4bit=False")
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": dev if dev != "cuda" else 0} if dev.startswith("cuda") else "cpu"
    tok = _load_tokenizer(base_dir)
    with _deterministic(cfg.seed, dev):
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, **kw)
        if not cfg.load_in_4bit:
            model.to(dev)
        else:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            # bitsandbytes (0.50) repacks a CPU Linear4bit weight in place for its AVX512-BF16 kernel on the first
            # no-grad forward (our eval_loss_before) and backward through the packed layout is wrong: keep the
            # trainable layout (what Unsloth's CPU loader does too)
            for m in model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = False
        model.config.use_cache = False
        missing = _check_targets(model, cfg.target_modules)
        if missing:
            emit(f"fine-tune: target_modules not in this model (ignored): {missing}")
        lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=[t for t in cfg.target_modules if t not in missing], bias="none",
                          use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, task_type="CAUSAL_LM")
        torch.manual_seed(cfg.seed)  # LoRA A init
        model = get_peft_model(model, lcfg)
        train = _train_loop(model, tok, examples, cfg, dev, emit)
    quant = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    extra = {"backend": "peft", "dtype": str(dtype).replace("torch.", ""), "load_in_4bit": quant,
             "missing_target_modules": missing, "versions": _versions()}
    return _write_outputs(model, stage, backend="peft", cfg=cfg, base_dir=base_dir, dataset_files=dataset_files,
                          num_examples=len(examples), train=train, extra=extra)


def _train_unsloth_in_process(args: dict, emit: Callable[[str], None]) -> dict:
    """The ``unsloth`` backend, run INSIDE the Unsloth subprocess (``unsloth`` already imported by the caller)."""
    import torch
    from unsloth import FastLanguageModel

    cfg = LoraTrainConfig.model_validate(args["cfg"])
    base_dir, stage = Path(args["base_dir"]), Path(args["out_dir"])
    dataset_files = [Path(f) for f in args["dataset_files"]]
    examples = load_examples(dataset_files)
    want = args.get("device", "auto")
    dev = "cuda" if (want in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    if want == "cuda" and dev != "cuda":
        raise TrainingError("device='cuda' but this interpreter's torch sees no CUDA device")
    with _deterministic(cfg.seed, dev):
        model, tok = FastLanguageModel.from_pretrained(
            model_name=str(base_dir), max_seq_length=cfg.max_seq_len,
            # CPU: fp32 master weights (exact, deterministic). GPU: let Unsloth pick bf16 / fp16.
            dtype=torch.float32 if dev == "cpu" and not cfg.load_in_4bit else None,
            load_in_4bit=cfg.load_in_4bit,
        )
        missing = _check_targets(model, cfg.target_modules)
        if missing:
            emit(f"fine-tune: target_modules not in this model (ignored): {missing}")
        peft_kw: dict[str, Any] = {"use_dora": True} if cfg.use_dora else {}
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
            target_modules=[t for t in cfg.target_modules if t not in missing], use_rslora=cfg.use_rslora,
            use_gradient_checkpointing="unsloth" if dev == "cuda" else False, random_state=cfg.seed,
            max_seq_length=cfg.max_seq_len, **peft_kw,
        )
        if hasattr(FastLanguageModel, "for_training"):
            FastLanguageModel.for_training(model)
        mdtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()),
                      torch.float32)
        autocast = mdtype if dev == "cuda" and mdtype in (torch.bfloat16, torch.float16) else None
        train = _train_loop(model, tok, examples, cfg, dev, emit, autocast_dtype=autocast)
    quant = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    extra = {"backend": "unsloth", "dtype": str(mdtype).replace("torch.", ""), "load_in_4bit": quant,
             "missing_target_modules": missing, "versions": _versions(("unsloth", "unsloth_zoo", "trl", "datasets"))}
    if cfg.load_in_4bit and not quant:
        emit("fine-tune: load_in_4bit was requested but Unsloth loaded 16-bit weights (bitsandbytes 4-bit is "
             "unavailable on this CPU or the layers are too narrow)")
    return _write_outputs(model, stage, backend="unsloth", cfg=cfg, base_dir=base_dir, dataset_files=dataset_files,
                          num_examples=len(examples), train=train, extra=extra)
