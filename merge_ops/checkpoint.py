"""A Hugging Face model directory seen as a lazy map of tensor name → :class:`TensorInfo`.

Only headers are read when a checkpoint is opened; tensor bytes are read on demand, a row range at a time, by
:func:`merge_ops.safetensors_io.read_rows`. Pickled weights (``*.bin``/``*.pt``) are refused unless the caller opts
in, and are then loaded with ``torch.load(weights_only=True)`` into a temporary safetensors file so the rest of the
engine sees one format.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lazy_torch import torch

from .errors import InputError
from .safetensors_io import TensorInfo, read_header, read_rows

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class Checkpoint:
    """Headers and config of one model directory. Holds no tensor data."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]
    converted_from_pickle: bool = False
    _tmpdir: Any = field(default=None, repr=False)
    #: set when the directory was a bitsandbytes 4-bit checkpoint read as float32, e.g. "nf4 → float32 (14 weights)"
    dequantized: str | None = None
    _pending: Any = field(default=None, repr=False)  # bnb_dequant.PendingDequant until materialized

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False, label: str | None = None) -> "Checkpoint":
        path = Path(path)
        who = f"model '{label}' ({path})" if label and label != str(path) else str(path)
        if not path.exists():
            raise InputError(f"{who}: directory does not exist")
        if not path.is_dir():
            raise InputError(f"{who}: expected a model directory (config.json + *.safetensors), got a file")
        if next(path.iterdir(), None) is None:
            raise InputError(f"{who}: the directory is empty (an interrupted download or copy?); expected config.json "
                             f"and *.safetensors weights")
        config_path = path / "config.json"
        config: dict[str, Any] = {}
        if config_path.exists():
            config = _read_json_object(config_path, "model config")
        files = _safetensors_files(path, who)
        converted = False
        tmp = None
        if not files:
            pickles = _pickle_files(path)
            if not pickles:
                raise InputError(
                    f"{who}: no weights found (expected model.safetensors, or model-0000K-of-0000N.safetensors with "
                    f"model.safetensors.index.json)"
                )
            if not allow_pickle:
                raise InputError(
                    f"{who}: only pickled weights ({', '.join(p.name for p in pickles)}) are present. Pickle files can "
                    f"run arbitrary code when loaded; convert them to safetensors, or pass --allow-pickle to load them "
                    f"with torch.load(weights_only=True)"
                )
            tmp = tempfile.TemporaryDirectory(prefix="mergeline-unpickled-")
            files = [_convert_pickle(p, Path(tmp.name)) for p in pickles]
            converted = True
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            infos, _ = read_header(f)
            for name, info in infos.items():
                if name in tensors:
                    raise InputError(f"{who}: tensor '{name}' appears in both {tensors[name].file.name} and {f.name}")
                tensors[name] = info
        if not tensors:
            raise InputError(f"{who}: the weight files hold no tensors")
        dequantized = pending = None
        from . import bnb_dequant

        if bnb_dequant.is_bnb_4bit(config, tensors):
            tmp = tmp or tempfile.TemporaryDirectory(prefix="mergeline-bnb-dequant-")
            tensors, config, dequantized, pending = bnb_dequant.dequantize_checkpoint(tensors, config,
                                                                                      Path(tmp.name), who)
        return cls(path, config, tensors, files, converted, tmp, dequantized, pending)

    def materialize(self) -> None:
        """Write what tensor infos point to but is not on disk yet (a 4-bit checkpoint's float32 view). Call before
        reading tensor bytes; planning needs only the infos."""
        if self._pending is not None:
            self._pending.materialize()

    # -- convenience -------------------------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        self.materialize()
        return read_rows(self.tensors[name])

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures")
        return archs[0] if isinstance(archs, list) and archs else self.config.get("model_type")

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            v = self.config.get(key)
            if isinstance(v, int):
                return v
        if isinstance(self.config.get("text_config"), dict):
            v = self.config["text_config"].get("num_hidden_layers")
            if isinstance(v, int):
                return v
        return None

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def input_files(self) -> list[Path]:
        """Every file whose bytes influence a merge output (for the manifest's input hashes)."""
        out = list(self.weight_files) if not self.converted_from_pickle else _pickle_files(self.path)
        for name in ("config.json", INDEX_FILE):
            if (self.path / name).is_file():
                out.append(self.path / name)
        return out


def _read_json_object(p: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; every way it can be broken becomes an InputError naming the file."""
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise InputError(f"{p}: cannot read the {what} ({e.strerror}); check the file's permissions") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: the {what} is not UTF-8 text ({e}); re-download or re-save it") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: the {what} is not valid JSON ({e}); re-download or re-save it") from e
    if not isinstance(data, dict):
        raise InputError(f"{p}: the {what} must be a JSON object, got {type(data).__name__}; re-download or re-save it")
    return data


def _no_dangling_links(files: list[Path], who: str) -> None:
    """A Hub cache snapshot holds symlinks into ``blobs/``; a deleted or never-finished blob leaves a dangling link,
    which would otherwise read as "no weights found"."""
    for f in files:
        if f.is_symlink() and not f.exists():
            raise InputError(f"{who}: {f.name} is a broken symbolic link (to {os.readlink(f)}, which is missing; an "
                             f"incomplete or pruned Hugging Face cache?); re-download the model")


def _safetensors_files(path: Path, who: str) -> list[Path]:
    index = path / INDEX_FILE
    single = path / SINGLE_FILE
    if single.is_dir():
        raise InputError(f"{who}: {single} is a directory, expected a safetensors file; remove or rename it")
    _no_dangling_links([single], who)
    if index.exists():
        weight_map = _read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: the shard index has no 'weight_map' object (tensor name -> shard file); "
                             f"re-download the model or re-save it with save_pretrained")
        for tname, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise InputError(f"{index}: weight_map maps tensor '{tname}' to {shard!r}; expected the file name of a "
                                 f"shard in {path}")
        names = sorted(set(weight_map.values()))
        _no_dangling_links([path / n for n in names], who)
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise InputError(f"{who}: {INDEX_FILE} lists shard(s) that are missing: {', '.join(missing)}")
        if single.exists() and SINGLE_FILE not in names:
            raise InputError(
                f"{who}: both {SINGLE_FILE} and {INDEX_FILE} are present, so it is ambiguous which weights are the "
                f"model (transformers would load {SINGLE_FILE}); delete the stale one")
        files = [path / n for n in names]
        # cross-check: every tensor the index names must be in the shard it names
        headers = {f.name: set(read_header(f)[0]) for f in files}
        for tname, shard in weight_map.items():
            if tname not in headers[shard]:
                raise InputError(f"{who}: {INDEX_FILE} says tensor '{tname}' is in {shard}, but it is not there")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(p for p in path.glob("*.safetensors") if p.is_file() and not p.name.startswith("adapter_model"))
    return others


def _pickle_files(path: Path) -> list[Path]:
    index = path / PICKLE_INDEX
    if index.exists():
        weight_map = _read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and ".." not in Path(v).parts
                                                        for v in weight_map.values()):
            raise InputError(f"{index}: the shard index needs a 'weight_map' object of tensor name -> shard file name")
        return [path / n for n in sorted(set(weight_map.values()))]
    return sorted(
        p for p in list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth"))
        if p.is_file() and not p.name.startswith(("training_args", "optimizer", "scheduler", "rng_state", "adapter_model"))
    )


def _convert_pickle(src: Path, tmpdir: Path) -> Path:
    """Load a pickle with ``weights_only=True`` (no code execution) and write it as safetensors."""
    from safetensors.torch import save_file

    try:
        try:
            state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # the legacy (pre-zipfile, torch < 1.6) format cannot be memory-mapped: load it into memory instead
            with warnings.catch_warnings():  # torch warns about the pickle protocol; the error path says enough
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and others
        raise InputError(f"{src}: cannot load with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{src}: expected a state dict of tensors (name -> tensor), got {type(state).__name__}; "
                         f"convert the file to safetensors")
    out = tmpdir / (src.stem + f"-{os.getpid()}.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
