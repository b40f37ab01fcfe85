"""Folding a PEFT LoRA adapter into base weights, one tensor (or row block) at a time.

Why not ``PeftModel.from_pretrained(...).merge_and_unload()``: that loads the whole base model into memory (and into
transformers' module classes), which is exactly what the streaming engine avoids. The LoRA update of one weight
only needs that weight plus a few small adapter matrices, so this module reproduces PEFT's merge arithmetic on
plain tensors: the engine reads a block of base rows, calls :meth:`LoraAdapter.apply`, and writes the result.
Nothing here imports transformers or peft.

Semantics (checked against peft 0.21's ``merge_and_unload``; the tests compare against it):

* Linear: ``W' = W + s·(B @ A)`` with ``A = lora_A.weight`` [r, in], ``B = lora_B.weight`` [out, r];
  ``s = alpha / r`` or, with ``use_rslora``, ``alpha / sqrt(r)``. ``r`` is read from ``lora_A``'s shape (that is what
  the tensors were trained with; ``rank_pattern`` only chose it). ``alpha`` is ``lora_alpha`` unless an
  ``alpha_pattern`` key matches the module path.
* Pattern keys (``rank_pattern``/``alpha_pattern``) are regular expressions matched like PEFT's ``get_pattern_key``:
  a key matches a module path when ``re.match(r"(.*\\.)?(KEY)$", path)`` succeeds, i.e. the key must match a whole
  dot-separated suffix of the path ("q_proj" matches "model.layers.0.self_attn.q_proj", "proj" does not); the first
  matching key in the file's order wins.
* GPT-2 style ``Conv1D`` weights are stored transposed ([in, out]); PEFT then merges ``(B @ A)ᵀ``. PEFT decides
  this per module from the module *class* (it overrides ``fan_in_fan_out`` with a warning when it disagrees), so
  here the layout is inferred per tensor from the base shape; only square weights, where the shape cannot tell,
  fall back to the config's ``fan_in_fan_out`` (or to Conv1D when other targets of the same adapter are Conv1D).
* Embedding: ``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B`` [dim, r] (saved without ``.weight``),
  ``W' = W + s·(B @ A)ᵀ``.
* DoRA (``lora_magnitude_vector``, saved without ``.weight``): ``V = W + Δ``, ``W' = V · m / ‖V‖``, where PEFT's
  norm runs over the *input* dimension of the layer: for nn.Linear that is each stored row (so a row block can be
  processed alone), for Conv1D it is each stored column, and for embeddings it is each embedding dimension over
  the whole vocabulary (each stored column). The last two need the whole tensor at once.
* ``lora_bias`` (``lora_B.bias``): ``b' = b + s·lora_B.bias``.
* Full tensors in the adapter file replace base tensors: ``modules_to_save`` copies (``<path>.weight``),
  ``bias="all"/"lora_only"`` biases, and the ``<path>.base_layer.weight`` copies PEFT saves for targeted embedding
  layers. PEFT loads them into the model *before* merging, so when a tensor has both a replacement and a LoRA
  update the update applies on top of the replacement (see :meth:`LoraAdapter.apply`). The output keeps the base
  tensor's dtype (PEFT loads the copy into the base parameter).
* Tied input/output embeddings (base without ``lm_head.weight``): see :meth:`LoraAdapter._resolve_tied` — LoRA on the
  head lands on the shared embedding tensor (after the embedding's own update); a ``modules_to_save`` copy of either
  unties the output (``lm_head.weight`` written, ``tie_word_embeddings: false``), as PEFT's merged model is untied.
* ``init_lora_weights`` "pissa"/"olora" (adapters not converted with ``path_initial_model_for_weight_conversion``):
  PEFT's load rebuilds a residual base (SVD / QR of each targeted Linear weight); merged the same way here, on the whole
  tensor. Randomized or data-dependent inits (``pissa_niter_*``, CorDA, LoftQ) and unknown ones are refused.
* Adapters trained under transformers 5 may name modules as the loaded model does, not as the checkpoint stores them
  (``model.language_model.*`` vs ``language_model.model.*``, ``lm_head`` vs GPT-NeoX ``embed_out``):
  :meth:`LoraAdapter._resolve_renames` maps them back.

Caller contract, per base tensor ``name``::

    src = adapter.replacement(name) or base.tensors[name]
    rows = read_rows(src, r0, r1).to(torch.float32)        # whole tensor when not adapter.is_row_local(name)
    rows = adapter.apply(name, rows, row_start=r0)         # identity for tensors without a LoRA update

:meth:`LoraAdapter.check_base` must run once before :meth:`~LoraAdapter.apply` (it validates the pairing and
settles the Conv1D-vs-Linear layout of square weights).
"""

from __future__ import annotations

import functools
import json
import math
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .lazy_torch import torch

from .errors import InputError, UnsupportedError
from .safetensors_io import TensorInfo, read_header, read_rows, read_rows_f32

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import Checkpoint

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

# Per-module LoRA tensor kinds as they appear in PEFT adapter keys.
_LORA_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# Adapter key components that belong to PEFT features whose merge this module does not implement.
_UNSUPPORTED_PARTS = {
    "token_adapter": "trainable_token_indices (TrainableTokens)",
    "trainable_tokens_delta": "trainable_token_indices (TrainableTokens)",
    "original_module": "an unmerged ModulesToSaveWrapper copy",
}
# init_lora_weights values whose adapters merge as plain LoRA: PEFT's load leaves the base weights alone (checked
# against peft 0.21: loading such an adapter on the original base and merging equals a plain merge).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# ("pissa" and "olora" are different: PEFT's *load* rewrites each targeted Linear weight into a residual W - s·B₀A₀ from
# an SVD / QR of W before the saved A/B are loaded, and merge_and_unload merges into that residual; see _residual_init.)
# transformers >= 5 runtime module names -> checkpoint names (the reverse of the WeightRenaming rules in transformers'
# conversion_mapping.py that matter for LoRA targets), one family per list; see LoraAdapter._resolve_renames.
_RUNTIME_RENAMES: tuple[tuple[tuple[str, str], ...], ...] = (
    # Llava, Mistral3
    ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head.")),
    ((r"^model\.language_model\.", "model."),),  # Qwen2-VL / Qwen2.5-VL text stack
    ((r"^lm_head\.", "embed_out."),),  # GPT-NeoX
)
# Last module-path component of output heads and input embeddings that transformers ties (tie_word_embeddings).
_HEAD_NAMES = ("lm_head", "embed_out")
_EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
DEFAULT_HEAD = "lm_head.weight"  # the output head of every *ForCausalLM model this was checked on
# LoraConfig fields that change what merging means (or make it impossible); any truthy value is refused.
_UNSUPPORTED_CONFIG = {
    "trainable_token_indices": "TrainableTokens rows",
    "layer_replication": "layer replication (the merged model would need duplicated layers)",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA cannot be merged, even by PEFT)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
}


def _residual_init(config: dict, cfg_path: Path | str) -> str | None:
    """``"pissa"``/``"olora"`` when PEFT's load turns the base weights into a residual, None for a plain merge;
    refuses the init values whose merge PEFT itself cannot reproduce from the original base.

    Why this matters: an adapter saved straight after PiSSA/OLoRA training (not converted with
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``) only makes sense on top of the residual base.
    PEFT's ``from_pretrained`` recomputes that residual from the original base (deterministic SVD / QR) and then
    merges; a plain ``W + s·B·A`` would be off by the principal components PEFT subtracted.
    """
    init = config.get("init_lora_weights", True)
    if init is None or isinstance(init, bool):
        return None
    if not isinstance(init, str):
        raise InputError(f"{cfg_path}: 'init_lora_weights' is {init!r}; expected true/false or a PEFT init name")
    convert = ("Save the adapter with PeftModel.save_pretrained(..., path_initial_model_for_weight_conversion="
               "<the untrained adapter directory>) (it becomes a plain LoRA on the original base), or merge with "
               "PEFT on the exact base it was trained on")
    if init == "pissa" or init.lower() == "olora":
        return init.lower()
    if init.startswith("pissa"):
        raise UnsupportedError(
            f"{cfg_path}: init_lora_weights is '{init}': PEFT rebuilds the residual base with a randomized SVD on "
            f"every load, so even PEFT's own merge differs run to run and cannot be reproduced. {convert}")
    if init.startswith("corda") or init == "loftq":
        raise UnsupportedError(
            f"{cfg_path}: init_lora_weights is '{init}': the adapter belongs to a base model modified at init "
            + ("(CorDA needs its preprocessed covariance data)" if init.startswith("corda") else "(LoftQ quantizes it)")
            + f"; PEFT cannot rebuild it from the original base either. {convert}")
    if init in _PLAIN_INITS or init.lower() == "gaussian":
        return None
    raise UnsupportedError(
        f"{cfg_path}: init_lora_weights is '{init}', which mergeline does not know; if that init may have modified "
        f"the base weights the merge would be wrong. If it did not (plain A/B initialisation), set "
        f"\"init_lora_weights\": true in adapter_config.json")


def _match_pattern(patterns: dict[str, Any], module_path: str, where: str) -> Any | None:
    """Value of the first pattern key that matches ``module_path`` the way PEFT matches it, else None.

    PEFT (``peft.utils.other.get_pattern_key``) treats each key as a regex that must match a dot-aligned suffix of
    the module path; reproducing that exactly matters because a looser rule (plain substring, ``re.search``)
    silently gives some modules another alpha than PEFT would.
    """
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module_path):
                return value
        except re.error as e:
            raise InputError(f"{where}: pattern key '{key}' is not a valid regular expression ({e})") from e
    return None


#: how many modules of an adapter keep their matrices in memory (see _Resident)
RESIDENT_MODULES = 4


class _Resident:
    """Which modules of one adapter hold their matrices in memory: the ``keep`` most recently used.

    Why: one module's matrices are small next to the base tensor they update, but all of them together are not small
    next to the memory budget (a rank-64 adapter on every projection of a 70 B model is ~3 GB as float32). The engine
    needs one module at a time (plus the one the prefetch thread reads), so keeping only the last few makes peak
    memory independent of the adapter's size; a dropped module is read again from the file if it is needed again.
    """

    def __init__(self, keep: int | None = None):
        self._keep = keep or RESIDENT_MODULES
        self._order: OrderedDict[int, _Module] = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, m: "_Module") -> None:
        with self._lock:
            self._order.pop(id(m), None)
            self._order[id(m)] = m
            while len(self._order) > self._keep:
                _, old = self._order.popitem(last=False)
                old._drop()


@dataclass
class _Module:
    """The LoRA update of one base module (``path`` is the module path, e.g. ``model.layers.0.self_attn.q_proj``).

    Its matrices (``A`` float32 [r, in] / [r, num_embeddings] for embeddings, ``B`` [out, r] / [dim, r],
    ``magnitude`` (DoRA) [out], ``bias`` (lora_B.bias) [out]) are known by shape from the file header and read when
    first used (:class:`_Resident` decides how long they stay); ``has``/``shape`` answer without reading.
    """

    path: str
    embedding: bool
    resident: _Resident | None = None
    keys: dict[str, str] = field(default_factory=dict)  # kind -> adapter key (for messages)
    scale: float = 0.0
    conv1d: bool | None = None  # stored weight is [in, out] (GPT-2 Conv1D); None until known
    residual_init: str | None = None  # "pissa" / "olora": PEFT rebuilds a residual base weight at load (Linear only)
    base_dtype: str | None = None  # safetensors dtype of the base tensor (the residual is rounded to it, as in PEFT)
    _src: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = field(default_factory=dict, repr=False)
    _arr: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _cache: dict[tuple, tuple] = field(default_factory=dict, repr=False)

    def has(self, slot: str) -> bool:
        return slot in self._src

    def shape(self, slot: str) -> tuple[int, ...]:
        return self._src[slot][0]

    def set_source(self, slot: str, shape: tuple[int, ...], load: Callable[[], np.ndarray]) -> None:
        """Where slot's float32 array comes from: a tensor of the adapter file, or one derived from another module's."""
        self._src[slot] = (tuple(shape), load)
        self._arr.pop(slot, None)
        self._cache.clear()

    def get(self, slot: str) -> np.ndarray | None:
        if slot not in self._src:
            return None
        a = self._arr.get(slot)
        if a is None:
            a = self._src[slot][1]()
            self._arr[slot] = a
        if self.resident is not None:
            self.resident.touch(self)
        return a

    def _drop(self) -> None:
        self._arr.clear()
        self._cache.clear()

    A = property(lambda self: self.get("A"))
    B = property(lambda self: self.get("B"))
    magnitude = property(lambda self: self.get("magnitude"))
    bias = property(lambda self: self.get("bias"))

    @property
    def rank(self) -> int:
        return self.shape("A")[0]

    @property
    def out_features(self) -> int:
        return self.shape("B")[0]

    @property
    def in_features(self) -> int:
        return self.shape("A")[1]

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """A, B, magnitude, bias moved to where the base rows live (cached while the module stays resident: the
        engine calls this per row block)."""
        k = (str(device), dtype)
        got = self._cache.get(k)
        if got is None:
            # copy=True: torch-allocated (64-byte aligned) storage; BLAS calls on numpy-backed (32-byte aligned)
            # operands cost hundreds of MB more peak RSS here
            conv = lambda t: None if t is None else torch.from_numpy(t).to(device=device, dtype=dtype, copy=True)  # noqa: E731
            got = (conv(self.A), conv(self.B), conv(self.magnitude), conv(self.bias))
            self._cache[k] = got
        elif self.resident is not None:
            self.resident.touch(self)
        return got


class LoraAdapter:
    """A PEFT LoRA adapter directory, validated, with its small matrices in memory.

    Attributes: ``path`` (the directory), ``config`` (``adapter_config.json`` as a dict), ``weight_file``.
    """

    def __init__(self, path: Path, config: dict, weight_file: Path, modules: dict[str, _Module],
                 replacements: dict[str, TensorInfo], tmpdir: Any = None, source_file: Path | None = None):
        self.path = path
        self.config = config
        self.weight_file = weight_file
        self._modules = modules
        self._replacements = replacements
        self._tmpdir = tmpdir  # keeps the converted pickle alive as long as the adapter
        self._source_file = source_file or weight_file  # the file the user gave (the .bin when converted)
        # base tensor name -> [(module, "weight" | "bias")], in PEFT's merge order. Usually one module per tensor;
        # with tied input/output embeddings the embedding's and the output head's updates both land on the one
        # stored tensor (see _resolve_tied).
        self._targets: dict[str, list[tuple[_Module, str]]] = {}
        for m in modules.values():
            self._targets[f"{m.path}.weight"] = [(m, "weight")]
            if m.has("bias"):
                self._targets[f"{m.path}.bias"] = [(m, "bias")]
        #: how check_base treated tied embeddings: None, "tied" (updates folded into the shared tensor) or
        #: "untied" (the output head written as its own tensor, tie_word_embeddings set false)
        self.tying: str | None = None
        self._untied: tuple[str, str] | None = None  # (head, embedding) when "untied"
        self.notes: list[str] = []  # things the caller should report (the manifest's warnings)
        residual = sorted({m.residual_init for m in modules.values() if m.residual_init})
        if residual:
            self.notes.append(
                f"adapter {path}: init_lora_weights '{residual[0]}': merged into the residual base PEFT rebuilds at "
                f"load ({'an SVD' if residual[0] == 'pissa' else 'a QR'} of each targeted weight, whole tensors: slow "
                f"on large models); save the adapter with path_initial_model_for_weight_conversion to merge it as "
                f"plain LoRA")

    # -- opening ---------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> "LoraAdapter":
        path = Path(path)
        if not path.exists():
            raise InputError(f"adapter {path}: directory does not exist")
        if not path.is_dir():
            raise InputError(
                f"adapter {path}: expected a PEFT adapter directory ({CONFIG_FILE} + {SAFETENSORS_FILE}), got a file; "
                f"pass the directory that contains it"
            )
        cfg_path = path / CONFIG_FILE
        try:
            subs = sorted(d for d in path.iterdir() if (d / CONFIG_FILE).is_file()) if not cfg_path.is_file() else []
        except OSError:  # unreadable directory: the messages below say what is missing
            subs = []
        if subs:
            # PeftModel.save_pretrained of a model with several adapters writes each non-default one to <dir>/<name>
            raise InputError(
                f"adapter {path}: no {CONFIG_FILE} here, but its subfolders hold adapters (PEFT saves each "
                f"non-default adapter of a multi-adapter model in its own subfolder); pass one of: "
                + ", ".join(str(d) for d in subs)
            )
        if not cfg_path.is_file():
            raise InputError(
                f"adapter {path}: {CONFIG_FILE} is missing; a PEFT adapter directory needs it (it holds lora_alpha, "
                f"use_rslora, rank/alpha patterns). Save the adapter with PeftModel.save_pretrained"
            )
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg_path}: cannot read adapter config ({e})") from e
        if not isinstance(config, dict):
            raise InputError(f"{cfg_path}: expected a JSON object")
        cls._validate_config(config, cfg_path)

        tmp = None
        pickled = False
        weight_file = path / SAFETENSORS_FILE
        if not weight_file.is_file():
            pkl = path / PICKLE_FILE
            if not pkl.is_file():
                raise InputError(f"adapter {path}: no weights found (expected {SAFETENSORS_FILE} or {PICKLE_FILE})")
            if not allow_pickle:
                raise InputError(
                    f"adapter {path}: only pickled weights ({PICKLE_FILE}) are present. Pickle files can run arbitrary "
                    f"code when loaded; convert the adapter to safetensors, or pass --allow-pickle to load it with "
                    f"torch.load(weights_only=True)"
                )
            from .checkpoint import _convert_pickle  # same conversion the base checkpoints use

            tmp = tempfile.TemporaryDirectory(prefix="mergeline-adapter-")
            weight_file = _convert_pickle(pkl, Path(tmp.name))
            pickled = True

        infos, _ = read_header(weight_file)
        if not infos:
            raise InputError(f"{weight_file}: the adapter file holds no tensors")
        source = path / PICKLE_FILE if pickled else weight_file
        modules, replacements = cls._parse_keys(infos, path, source, config)
        return cls(path, config, weight_file, modules, replacements, tmp, source)

    @staticmethod
    def _validate_config(config: dict, cfg_path: Path) -> None:
        peft_type = str(config.get("peft_type", "")).upper()
        if not peft_type:
            raise InputError(f"{cfg_path}: 'peft_type' is missing; expected \"LORA\" (a PEFT LoRA adapter config)")
        if peft_type != "LORA":
            raise UnsupportedError(
                f"{cfg_path}: peft_type is {config.get('peft_type')!r}; mergeline merges LoRA adapters only "
                f"(peft_type \"LORA\"). Merge this adapter with PEFT (merge_and_unload) and use the result as a model"
            )
        for key, what in _UNSUPPORTED_CONFIG.items():
            if config.get(key):
                detail, todo = "", ""
                if key == "target_parameters":
                    # transformers 5 stores MoE experts as fused 3-D parameters; PEFT's "all-linear" (and names like
                    # "gate" for a router) then become target_parameters, folded into fused tensors that checkpoints
                    # store per expert under other names
                    detail = (f": {config.get(key)!r}; with transformers 5, target_modules='all-linear' on a mixture-"
                              f"of-experts model targets the fused expert/router parameters this way")
                    todo = "Train with explicit target_modules that leave out the experts and the router, or merge"
                raise UnsupportedError(
                    f"{cfg_path}: '{key}' is set ({what}{detail}); mergeline cannot fold that into base weights. "
                    + (todo or "Merge") + " with PEFT's merge_and_unload and pass the merged model instead"
                )
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key) is not None and not isinstance(config.get(key), dict):
                raise InputError(f"{cfg_path}: '{key}' must be an object mapping module patterns to numbers")
            for pat, val in (config.get(key) or {}).items():
                if isinstance(val, bool) or not isinstance(val, (int, float)):
                    raise InputError(f"{cfg_path}: {key}['{pat}'] must be a number, got {val!r}")
        for key in ("lora_alpha", "r"):
            if key in config and not isinstance(config[key], (int, float)):
                raise InputError(f"{cfg_path}: '{key}' must be a number, got {config[key]!r}")
        _residual_init(config, cfg_path)

    @classmethod
    def _parse_keys(cls, infos: dict[str, TensorInfo], path: Path, weight_file: Path,
                    config: dict) -> tuple[dict[str, _Module], dict[str, TensorInfo]]:
        """Sort adapter keys into per-module LoRA parts and full replacement tensors; reject anything else.

        Keys may carry PEFT's adapter name (``lora_A.default.weight``) or not (``lora_A.weight``, how PEFT saves);
        both mean the same, but a file mixing several adapter names is ambiguous and refused.
        """
        where = str(weight_file)
        modules: dict[str, _Module] = {}
        resident = _Resident()
        replacements: dict[str, TensorInfo] = {}
        replacement_keys: dict[str, str] = {}
        adapter_names: set[str] = set()
        for key, info in infos.items():
            rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
            parts = rel.split(".")
            for p in parts:
                if p in _UNSUPPORTED_PARTS:
                    raise UnsupportedError(
                        f"{where}: adapter key '{key}' belongs to {_UNSUPPORTED_PARTS[p]}, which mergeline cannot "
                        f"merge; merge with PEFT's merge_and_unload and pass the merged model instead"
                    )
            kind_idx = next((i for i, p in enumerate(parts) if p in _LORA_KINDS), None)
            if kind_idx is None:
                # A full tensor. PEFT writes modules_to_save copies as '<path>.<param>', the base weights of targeted
                # embeddings as '<path>.base_layer.<param>', and older files '<path>.modules_to_save[.<name>].<param>'.
                if any(p.startswith("lora_") for p in parts) or parts[-1] not in ("weight", "bias") or len(parts) < 2:
                    raise UnsupportedError(
                        f"{where}: adapter key '{key}' is of a kind mergeline does not know (expected lora_A/lora_B, "
                        f"lora_embedding_A/B, lora_magnitude_vector or a full '.weight'/'.bias' tensor); this adapter "
                        f"likely uses a PEFT feature mergeline does not support. Merge it with PEFT's merge_and_unload"
                    )
                mod = parts[:-1]
                if "modules_to_save" in mod:
                    i = mod.index("modules_to_save")
                    rest = mod[i + 1:]
                    if len(rest) > 1:
                        raise UnsupportedError(f"{where}: adapter key '{key}' has an unexpected modules_to_save layout")
                    adapter_names.update(rest)
                    mod = mod[:i]
                elif mod and mod[-1] == "base_layer":
                    mod = mod[:-1]
                base_name = ".".join(mod + [parts[-1]])
                if base_name in replacements:
                    raise InputError(
                        f"{where}: adapter keys '{replacement_keys[base_name]}' and '{key}' both replace base tensor "
                        f"'{base_name}'; the adapter file is inconsistent, re-save it with PEFT"
                    )
                if not info.is_float:
                    raise InputError(f"{where}: adapter tensor '{key}' has dtype {info.dtype}; expected floating point")
                replacements[base_name] = info
                replacement_keys[base_name] = key
                continue

            kind = parts[kind_idx]
            mpath = ".".join(parts[:kind_idx])
            tail = parts[kind_idx + 1:]
            param = None
            if tail and tail[-1] in ("weight", "bias"):
                param = tail[-1]
                tail = tail[:-1]
            if len(tail) > 1 or not mpath:
                raise UnsupportedError(f"{where}: adapter key '{key}' does not look like a PEFT LoRA key")
            adapter_names.update(tail)
            # lora_A/B end in .weight (or .bias for lora_bias); embedding parts and magnitude have no suffix (newer
            # PEFT) or '.weight' (DoRA layers saved by some versions).
            if kind in ("lora_A", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector") and param == "bias":
                raise UnsupportedError(f"{where}: adapter key '{key}' is of a kind mergeline does not know")
            if kind == "lora_B" and param is None:
                raise UnsupportedError(f"{where}: adapter key '{key}' does not look like a PEFT LoRA key")
            if not info.is_float:
                raise InputError(f"{where}: adapter tensor '{key}' has dtype {info.dtype}; expected floating point")
            embedding = kind.startswith("lora_embedding")
            m = modules.get(mpath)
            if m is None:
                m = modules[mpath] = _Module(mpath, embedding, resident)
            elif not m.has("A") and not m.has("B") and kind.startswith(("lora_A", "lora_B", "lora_embedding")):
                m.embedding = embedding  # created by a magnitude/bias key; the A/B kind decides
            slot = {"lora_A": "A", "lora_embedding_A": "A", "lora_B": "B", "lora_embedding_B": "B",
                    "lora_magnitude_vector": "magnitude"}[kind]
            if kind == "lora_B" and param == "bias":
                slot = "bias"
            if slot in ("A", "B") and embedding != m.embedding:
                raise InputError(
                    f"{where}: module '{mpath}' has both lora_A/lora_B and lora_embedding_A/B keys ('{key}'); the "
                    f"adapter file is inconsistent, re-save it with PEFT"
                )
            if m.has(slot):
                raise InputError(
                    f"{where}: module '{mpath}' has two '{slot}' tensors ('{m.keys[slot]}' and '{key}'); "
                    f"the adapter file is inconsistent (several adapters in one file?)"
                )
            # read when used, as float32 numpy arrays (exact-enough math on any device; numpy so that a plain LoRA
            # merge on the CPU never needs torch — see lazy_torch); only a few modules stay in memory (_Resident)
            m.set_source(slot, info.shape, functools.partial(read_rows_f32, info))
            m.keys[slot] = key

        if len(adapter_names) > 1:
            raise UnsupportedError(
                f"{where}: the file holds several adapters ({', '.join(sorted(adapter_names))}); save a single adapter "
                f"per directory (PeftModel.save_pretrained(selected_adapters=[...]))"
            )
        cls._validate_modules(modules, where, config)
        return modules, replacements

    @staticmethod
    def _validate_modules(modules: dict[str, _Module], where: str, config: dict) -> None:
        """Pairing and rank checks that need no base model, plus each module's scale (PEFT's ``scaling``)."""
        use_dora = bool(config.get("use_dora"))
        alpha_default = config.get("lora_alpha", 8)
        alpha_pattern = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora"))
        for m in modules.values():
            a_name = "lora_embedding_A" if m.embedding else "lora_A"
            b_name = "lora_embedding_B" if m.embedding else "lora_B"
            if not m.has("A") or not m.has("B"):
                have, miss = (a_name, b_name) if not m.has("B") else (b_name, a_name)
                if not m.has("A") and not m.has("B"):
                    have, miss = "lora_magnitude_vector/lora_B.bias", f"{a_name} and {b_name}"
                raise InputError(
                    f"{where}: module '{m.path}' has {have} but no {miss}; the adapter file is incomplete "
                    f"(re-save it with PeftModel.save_pretrained)"
                )
            if len(m.shape("A")) != 2 or len(m.shape("B")) != 2:
                raise UnsupportedError(
                    f"{where}: '{m.keys['A']}' has shape {list(m.shape('A'))} and '{m.keys['B']}' {list(m.shape('B'))}; "
                    f"only 2-D LoRA (Linear, Conv1D, Embedding) is supported, not LoRA on convolutions"
                )
            if m.shape("A")[0] != m.shape("B")[1] or m.shape("A")[0] == 0:
                raise InputError(
                    f"{where}: rank mismatch in module '{m.path}': '{m.keys['A']}' has shape {list(m.shape('A'))} "
                    f"(rank {m.shape('A')[0]}) but '{m.keys['B']}' has shape {list(m.shape('B'))} (rank {m.shape('B')[1]}); "
                    f"the adapter file is corrupt or mixes adapters"
                )
            if m.has("magnitude"):
                if not use_dora:
                    raise InputError(
                        f"{where}: module '{m.path}' has a DoRA magnitude ('{m.keys['magnitude']}') but the adapter "
                        f"config has use_dora false; PEFT would ignore it. Fix adapter_config.json (use_dora: true) "
                        f"if the adapter was trained with DoRA"
                    )
                if m.shape("magnitude") != (m.out_features,):
                    raise InputError(
                        f"{where}: '{m.keys['magnitude']}' has shape {list(m.shape('magnitude'))}, expected "
                        f"[{m.out_features}] to match '{m.keys['B']}' {list(m.shape('B'))}"
                    )
            elif use_dora:
                raise InputError(
                    f"{where}: adapter config has use_dora true but module '{m.path}' has no lora_magnitude_vector; "
                    f"the adapter file is incomplete (re-save it with PEFT)"
                )
            if m.has("bias") and m.shape("bias") != (m.out_features,):
                raise InputError(
                    f"{where}: '{m.keys['bias']}' has shape {list(m.shape('bias'))}, expected [{m.out_features}]"
                )
            # PEFT builds each module with r = rank_pattern match or 'r' (default 8) and then loads the tensors: a
            # different rank in the file makes PEFT fail (size mismatch), so it is an error here too, not a guess
            expected = _match_pattern(config.get("rank_pattern") or {}, m.path, where)
            said = "its rank_pattern gives" if expected is not None else "says"
            expected = config.get("r", 8) if expected is None else expected
            if isinstance(expected, (int, float)) and not isinstance(expected, bool) and expected != m.rank:
                default = " (PEFT's default: the config does not set 'r')" if "r" not in config and \
                    said == "says" else ""
                raise InputError(
                    f"{where}: '{m.keys['A']}' has rank {m.rank}, but {CONFIG_FILE} {said} r = {expected:g}{default}; "
                    f"PEFT would refuse to load this adapter (size mismatch). Set 'r' (or a 'rank_pattern' entry for "
                    f"'{m.path}') in {CONFIG_FILE} to the rank the adapter was trained with"
                )
            # a NaN/inf in the small matrices would spread over the whole merged weight; checking costs one pass over
            # data already in memory (the adapter's A/B/magnitude/bias; modules_to_save copies are not checked)
            for slot in ("A", "B", "magnitude", "bias"):
                arr = getattr(m, slot)
                if arr is not None and not np.isfinite(arr).all():
                    bad = int(arr.size - np.isfinite(arr).sum())
                    raise InputError(
                        f"{where}: adapter tensor '{m.keys[slot]}' holds {bad} NaN/inf value(s); merging it would "
                        f"write NaN/inf into '{m.path}'. The adapter is broken (diverged training?): use an earlier "
                        f"checkpoint or retrain"
                    )
            alpha = _match_pattern(alpha_pattern, m.path, where)
            alpha = alpha_default if alpha is None else alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise InputError(f"{where}: lora_alpha for module '{m.path}' is {alpha!r}; expected a number "
                                 f"(check lora_alpha / alpha_pattern in adapter_config.json)")
            r = m.rank
            m.scale = alpha / math.sqrt(r) if rslora else alpha / r
            if not m.embedding:  # PEFT's Embedding layers ignore pissa/olora (plain init)
                m.residual_init = _residual_init(config, where)

    # -- queries ---------------------------------------------------------------------------------------------------
    @property
    def untied_head(self) -> str | None:
        """The output head tensor check_base added to an untied base (see _resolve_tied), else None."""
        return self._untied[0] if self._untied else None

    def changed_tensors(self) -> set[str]:
        """Base tensor names whose merged value differs from the base (LoRA updates and replacements)."""
        return set(self._targets) | set(self._replacements)

    def replacement(self, name: str) -> TensorInfo | None:
        """The adapter's full copy of base tensor ``name`` (read it lazily with ``read_rows``), or None.

        A LoRA update may still apply on top of it (PEFT loads these copies before merging): always pass the rows
        through :meth:`apply` afterwards.
        """
        return self._replacements.get(name)

    def scale(self, name: str) -> float | None:
        """PEFT's ``scaling`` for the (first) module behind base tensor ``name`` (None if it has no LoRA update)."""
        t = self._targets.get(name)
        return t[0][0].scale if t else None

    def is_row_local(self, name: str) -> bool:
        """Whether :meth:`apply` on a block of rows of ``name`` needs only those rows.

        False for DoRA whose norm runs down the stored columns (Conv1D and embedding layers: every output row depends
        on the whole column norm) and for PiSSA/OLoRA residual inits (an SVD / QR of the whole weight); the caller must
        then pass the whole tensor.
        """
        for m, what in self._targets.get(name, ()):
            if what == "weight" and m.residual_init:
                return False  # the SVD / QR needs the whole weight
            if what == "bias" or not m.has("magnitude"):
                continue
            if m.embedding or self._conv1d(m, None):
                return False
        return True

    def plain_update(self, name: str) -> tuple[np.ndarray, np.ndarray, float] | None:
        """``(A, B, s)`` (float32 numpy) when base tensor ``name`` gets a plain row-local LoRA update
        ``W + s·(B @ A)`` — exactly one update (not a tied head on top of an embedding), no DoRA, not an embedding,
        not a Conv1D layout, not a bias, no residual init — else None. The engine's numpy fast path handles exactly
        these; everything else goes through :meth:`apply` (torch)."""
        t = self._targets.get(name)
        if t is None or len(t) != 1:
            return None
        m, what = t[0]
        if what == "bias" or m.has("magnitude") or m.embedding or m.residual_init or self._conv1d(m, None):
            return None
        return m.A, m.B, m.scale

    def input_files(self) -> list[Path]:
        """Files whose bytes determine the merge result (hashed into the output manifest)."""
        return [self.path / CONFIG_FILE, self._source_file]

    # -- checking against a base -------------------------------------------------------------------------------------
    def _who(self) -> str:
        base = self.config.get("base_model_name_or_path")
        return f"adapter {self.path}" + (f" (trained on '{base}')" if base else "")

    def _conv1d(self, m: _Module, base_shape: tuple[int, ...] | None) -> bool:
        """Whether module ``m``'s stored base weight is [in, out] (Conv1D): from the shape when it tells, else from
        the config / the other targets (see module docstring)."""
        if m.embedding:
            return False
        if base_shape is not None and m.out_features != m.in_features:
            return tuple(base_shape) == (m.in_features, m.out_features)
        if m.conv1d is not None:
            return m.conv1d
        return bool(self.config.get("fan_in_fan_out"))

    def _resolve_renames(self, base: "Checkpoint") -> None:
        """Map adapter module paths written with transformers ≥ 5 *runtime* names onto the checkpoint's names.

        transformers 5 renames some modules when it loads a checkpoint and renames them back when it saves
        (``conversion_mapping.py``): a PEFT adapter trained under it names ``model.language_model.layers.0…`` while
        the Llava checkpoint on disk says ``language_model.model.layers.0…`` (Qwen2-VL: ``model.layers.0…``,
        GPT-NeoX: ``embed_out`` for ``lm_head``). PEFT loads the base through
        transformers, so it never sees the difference; here the rename is undone with the reverse rules below, one
        family at a time, and only for names the base lacks and the rule turns into a name the base has.
        """
        names = sorted((set(self._targets) | set(self._replacements)) - set(base.tensors))
        if not names:
            return
        best: dict[str, str] = {}
        for rules in _RUNTIME_RENAMES:
            mapping = {}
            for n in names:
                for rx, repl in rules:
                    new = re.sub(rx, repl, n, count=1)
                    if new != n and new in base.tensors:
                        mapping[n] = new
                        break
            if len(mapping) > len(best):
                best = mapping
        for old, new in best.items():
            if new in self._targets or new in self._replacements:
                raise InputError(
                    f"{self._who()}: adapter tensors for both '{old}' and '{new}' (two names of one base tensor, "
                    f"'{new}' in {base.path}); the adapter file is inconsistent")
        for old, new in best.items():
            if old in self._targets:
                self._targets[new] = self._targets.pop(old)
            if old in self._replacements:
                self._replacements[new] = self._replacements.pop(old)
        if best:
            sample = next(iter(best.items()))
            self.notes.append(
                f"adapter {self.path}: the names of {len(best)} base tensors follow transformers' runtime module "
                f"names, mapped to the checkpoint's (e.g. '{sample[0]}' → '{sample[1]}')")

    def _ties_copies(self) -> bool:
        """Whether PEFT keeps tied modules_to_save copies tied: ``ensure_weight_tying`` works only when one of the
        saved modules is named like PEFT's ``EMBEDDING_LAYER_NAMES`` (``embed_tokens``/``lm_head``; not GPT-2's
        ``wte``, for example)."""
        mts = self.config.get("modules_to_save") or []
        return bool(self.config.get("ensure_weight_tying")) and any(
            str(x).split(".")[-1] in ("embed_tokens", "lm_head") for x in mts)

    def _ties_targets(self) -> bool:
        """Whether PEFT (``ensure_weight_tying``) re-creates a tied LoRA on the output head at load: only when
        ``target_modules`` names an embedding the way PEFT recognises it (last component ``embed_tokens``/``lm_head``;
        the saved config lists the embedding only)."""
        tm = self.config.get("target_modules")
        names = ("embed_tokens", "lm_head")
        if isinstance(tm, str):
            return any(re.fullmatch(tm, n) for n in names)
        return any(str(x).split(".")[-1] in names for x in (tm or []))

    def _resolve_tied(self, base: "Checkpoint") -> None:
        """Reproduce what PEFT does with tied input/output embeddings (``tie_word_embeddings``).

        A tied base stores one tensor (e.g. ``model.embed_tokens.weight``) and no ``lm_head.weight``; in the model
        both modules hold the *same* Parameter. PEFT then behaves as follows (checked against peft 0.21):

        * LoRA on ``lm_head`` (and/or the embedding): every merge writes into the shared Parameter, so the
          embedding's update and then the head's land on the one stored tensor (the model stays tied). A saved
          ``lm_head.base_layer.weight`` copy is loaded into it after the embedding's copy, so the head's wins.
        * ``modules_to_save`` on ``lm_head`` or the embedding (without ``ensure_weight_tying``): the trained copy
          replaces one module only, so the merged model is *untied* — the other keeps the base weight, and
          transformers saves such a model with both tensors and ``tie_word_embeddings: false``. Here: the head is
          added as its own output tensor (the base embedding's bytes, or the adapter's copy) and the output
          config says ``tie_word_embeddings: false``.
        * ``modules_to_save`` with ``ensure_weight_tying``: both copies are saved and loaded into one Parameter
          (the head's last): stays tied.
        """
        conf = base.config if isinstance(base.config, dict) else {}
        text_conf = conf.get("text_config") if isinstance(conf.get("text_config"), dict) else {}

        def untie(head: str, emb: str) -> None:
            base.tensors[head] = base.tensors[emb]  # the head starts from the base embedding's bytes
            for c in (conf, text_conf):
                if "tie_word_embeddings" in c or c is conf:
                    c["tie_word_embeddings"] = False

        if self.tying is not None:  # settled by an earlier check_base: only redo what it did to the base
            if self._untied is not None and self._untied[0] not in base.tensors and self._untied[1] in base.tensors:
                untie(*self._untied)
            return
        tie = conf.get("tie_word_embeddings", text_conf.get("tie_word_embeddings", True))
        if tie is False:
            return
        touched = {n for n in self._targets if n.endswith(".weight")} | set(self._replacements)
        heads = sorted(n for n in touched if n not in base.tensors and len(n.split(".")) >= 2
                       and n.split(".")[-2] in _HEAD_NAMES)
        copies = {n for n, info in self._replacements.items() if ".base_layer." not in info.name}
        embeds = [n for n in base.tensors if n.endswith(".weight") and len(n.split(".")) >= 2
                  and n.split(".")[-2] in _EMBED_NAMES and len(base.tensors[n].shape) == 2]
        if not heads:
            # only the embedding is touched: a modules_to_save copy of it unties the model (the head keeps the base
            # weight); LoRA on it changes the shared tensor, which a tied reload reproduces by itself
            emb_copies = [n for n in embeds if n in copies]
            if len(emb_copies) == 1 and DEFAULT_HEAD not in base.tensors and not self._ties_copies():
                heads = [DEFAULT_HEAD]
            else:
                return
        for head in heads:
            shape = self._replacements[head].shape if head in self._replacements else None
            if shape is None:
                m = next((m for m, w in self._targets.get(head, ()) if w == "weight"), None)
                shape = (m.out_features, m.in_features) if m is not None else None
            cands = [n for n in embeds if shape is None or tuple(base.tensors[n].shape) == tuple(shape)]
            if len(cands) != 1:
                return  # cannot tell which tensor the head is tied to: check_base reports the missing tensor
            emb = cands[0]
            if (head in copies or emb in copies) and not self._ties_copies():
                untie(head, emb)
                self._untied = (head, emb)
                self.tying = "untied"
                self.notes.append(
                    f"adapter {self.path}: modules_to_save on '{head if head in copies else emb}' of a model with tied "
                    f"embeddings: as in PEFT's merge the output embedding and '{head}' differ, so '{head}' is written "
                    f"as its own tensor and tie_word_embeddings is set to false")
            else:
                # PEFT merges into the shared Parameter: the head's update follows the embedding's on one tensor
                head_mods = self._targets.pop(head, [])
                emb_mod = next((m for m, w in self._targets.get(emb, ()) if m.embedding), None)
                if self.config.get("ensure_weight_tying") and emb_mod is not None and head_mods:
                    if self._ties_targets():
                        # the head's LoRA *is* the embedding's (lora_A = Bᵀ, lora_B = Aᵀ, one storage); the head's
                        # keys load last, so their values win for both, and PEFT merges both: the update lands twice
                        hm = head_mods[0][0]
                        emb_mod.set_source("A", hm.shape("B")[::-1], lambda hm=hm: np.ascontiguousarray(hm.B.T))
                        emb_mod.set_source("B", hm.shape("A")[::-1], lambda hm=hm: np.ascontiguousarray(hm.A.T))
                    else:
                        head_mods = []  # PEFT does not recreate the head's LoRA at load: its saved keys are unused
                self._targets.setdefault(emb, []).extend(head_mods)
                if head in self._replacements:
                    self._replacements[emb] = self._replacements.pop(head)
                self.tying = "tied"
                self.notes.append(
                    f"adapter {self.path}: '{head}' is tied to '{emb}' in the base model; as in PEFT's merge, its "
                    f"update is applied to the shared tensor '{emb}' (so the input embedding changes too)")

    def check_base(self, base: "Checkpoint") -> None:
        """Raise InputError unless every tensor this adapter touches exists in ``base`` with a fitting shape.

        Also settles the per-module layout (Linear [out, in] vs Conv1D [in, out]) that :meth:`apply` relies on.
        A mismatch usually means the adapter was trained for another base model; catching it here, before any
        tensor is written, beats a shape error (or a silently wrong merge for square weights) half-way through.
        """
        who = self._who()
        self._resolve_renames(base)
        self._resolve_tied(base)
        for name, info in sorted(self._replacements.items()):
            b = base.tensors.get(name)
            if b is None:
                raise InputError(
                    f"{who}: adapter tensor '{info.name}' replaces base tensor '{name}', which base model {base.path} "
                    f"does not have (tied embeddings, or an adapter for another architecture?). Use the base model "
                    f"the adapter was trained on"
                )
            if tuple(b.shape) != tuple(info.shape):
                raise InputError(
                    f"{who}: adapter tensor '{info.name}' has shape {list(info.shape)} but base tensor '{name}' in "
                    f"{base.path} has shape {list(b.shape)} (adapter trained on another base, or with a resized "
                    f"vocabulary?). Use the matching base model, or resize the base first"
                )
        # first pass: layouts known from non-square shapes
        decided: list[_Module] = []
        for name, m, what in sorted(((n, m, w) for n, mods in self._targets.items() for m, w in mods),
                                    key=lambda x: (x[0], x[1].path)):
            b = base.tensors.get(name)
            if b is None:
                raise InputError(
                    f"{who}: adapter key '{m.keys['B' if what == 'weight' else 'bias']}' targets base tensor '{name}', "
                    f"which base model {base.path} does not have ("
                    + ("PEFT's lora_bias needs a base layer with a bias" if what == "bias" else
                       "the adapter was probably trained for another model") + "). Use the base model the adapter was "
                    f"trained on"
                )
            if not b.is_float:
                raise InputError(f"{who}: base tensor '{name}' in {base.path} has dtype {b.dtype}; LoRA needs floats")
            if what == "weight":
                m.base_dtype = b.dtype
            if what == "bias":
                if tuple(b.shape) != (m.out_features,):
                    raise InputError(
                        f"{who}: '{m.keys['bias']}' has shape {list(m.shape('bias'))} but base tensor '{name}' has shape "
                        f"{list(b.shape)}; the adapter was trained for another base model. Use the matching base"
                    )
                continue
            shape = tuple(b.shape)
            if m.embedding:
                expected = [(m.in_features, m.out_features)]
                desc = (f"'{m.keys['A']}' {list(m.shape('A'))} and '{m.keys['B']}' {list(m.shape('B'))} need an embedding "
                        f"of shape [{m.in_features}, {m.out_features}]")
            else:
                expected = [(m.out_features, m.in_features), (m.in_features, m.out_features)]
                desc = (f"'{m.keys['A']}' {list(m.shape('A'))} and '{m.keys['B']}' {list(m.shape('B'))} need a weight of "
                        f"shape [{m.out_features}, {m.in_features}] (or [{m.in_features}, {m.out_features}] for "
                        f"GPT-2 style Conv1D)")
            if shape not in expected:
                raise InputError(
                    f"{who}: shape mismatch for base tensor '{name}' in {base.path}: it has shape {list(shape)}, but "
                    f"{desc}. The adapter was trained for another base model; use the base it was trained on"
                )
            if not m.embedding and m.out_features != m.in_features:
                m.conv1d = shape == (m.in_features, m.out_features)
                decided.append(m)
                if m.conv1d and m.residual_init == "olora":
                    raise UnsupportedError(
                        f"{who}: init_lora_weights 'olora' on the Conv1D (fan_in_fan_out) module '{m.path}': PEFT's "
                        f"OLoRA init factors the stored [in, out] weight, which does not fit the saved lora_A/lora_B "
                        f"(PEFT cannot load this adapter either). Convert it with path_initial_model_for_weight_"
                        f"conversion or merge with PEFT on the base it was trained on")
        # second pass: square weights. PEFT picks the layout from the module class; the shape cannot tell, so use
        # fan_in_fan_out, or Conv1D when the adapter's other (non-square) targets show the model uses Conv1D.
        # PEFT builds the PiSSA/OLoRA residual at load and then loads the saved state dict: a saved base_layer copy
        # of the module (lm_head, embeddings) overwrites the residual, so that module merges as plain LoRA on the copy
        for name, mods in self._targets.items():
            if name in self._replacements:
                for m, _ in mods:
                    m.residual_init = None
        any_conv = any(m.conv1d for m in decided)
        for m in self._modules.values():
            if not m.embedding and m.out_features == m.in_features:
                m.conv1d = bool(self.config.get("fan_in_fan_out")) or any_conv
            m._cache.clear()

    # -- the merge ---------------------------------------------------------------------------------------------------
    def apply(self, name: str, weight: torch.Tensor, row_start: int = 0) -> torch.Tensor:
        """Rows ``[row_start, row_start + len(weight))`` of merged tensor ``name``, given the same rows of its input.

        ``weight`` is the base (or :meth:`replacement`) rows in float32/float64 on any device; the result has the same
        dtype and device (the small adapter matrices are moved there, cached). Tensors without a LoRA update come back
        unchanged. Plain LoRA updates ``weight`` in place (callers pass a buffer they own). Operation order follows PEFT (``(B @ A) · s`` then ``+ W``) so results agree to rounding.
        """
        t = self._targets.get(name)
        if t is None:
            return weight
        for m, what in t:  # several only for tied embeddings: in PEFT's merge order (embedding, then head)
            weight = self._apply_one(name, m, what, weight, row_start)
        return weight

    @staticmethod
    def _residual(m: _Module, weight: torch.Tensor, conv: bool) -> torch.Tensor:
        """The base weight PEFT's load leaves behind for PiSSA / OLoRA adapters, computed with PEFT's own operations
        (``pissa_init`` / ``olora_init``) in float32, then rounded to the base tensor's dtype as PEFT stores it."""
        w = weight.to(torch.float32)
        r, s = m.rank, m.scale
        if m.residual_init == "pissa":
            w = w.T if conv else w  # PEFT transposes fan_in_fan_out (Conv1D) weights to [out, in] first
            V, S, Uh = torch.linalg.svd(w, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
            lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
            lora_B = Vr @ torch.diag(torch.sqrt(Sr))
            res = w - s * lora_B @ lora_A
            res = res.T if conv else res
        else:  # olora: a QR of the stored weight, as PEFT does it (no fan_in_fan_out handling)
            Q, R = torch.linalg.qr(w)
            res = w - s * Q[:, :r].contiguous() @ R[:r].contiguous()
        if m.base_dtype in ("BF16", "F16"):
            res = res.to(torch.bfloat16 if m.base_dtype == "BF16" else torch.float16).to(torch.float32)
        return res.to(weight.dtype).contiguous()

    def _apply_one(self, name: str, m: _Module, what: str, weight: torch.Tensor, row_start: int) -> torch.Tensor:
        if not weight.is_floating_point():
            raise TypeError(f"internal: apply('{name}') needs floating-point rows, got {weight.dtype}")
        A, B, mag, bias = m.on(weight.device, weight.dtype)
        n = weight.shape[0]
        rows = slice(row_start, row_start + n)
        s = m.scale
        if what == "bias":
            if weight.dim() != 1 or row_start + n > bias.shape[0]:
                raise ValueError(f"internal: apply('{name}'): rows {row_start}..{row_start + n} outside bias "
                                 f"[{bias.shape[0]}] (shape {list(weight.shape)})")
            return weight + bias[rows] * s

        if m.embedding:
            full_rows, row_dim = m.in_features, m.out_features
            conv = False
        else:
            conv = self._conv1d(m, None)
            full_rows, row_dim = (m.in_features, m.out_features) if conv else (m.out_features, m.in_features)
        if weight.dim() != 2 or weight.shape[1] != row_dim or row_start < 0 or row_start + n > full_rows:
            raise ValueError(
                f"internal: apply('{name}'): got rows {row_start}..{row_start + n} of shape {list(weight.shape)}, "
                f"but the adapter module '{m.path}' updates a [{full_rows}, {row_dim}] tensor (check_base not called?)"
            )
        if m.residual_init:
            if n != full_rows:
                raise ValueError(f"internal: apply('{name}'): {m.residual_init} init needs the whole tensor "
                                 f"(is_row_local is False), got rows {row_start}..{row_start + n} of {full_rows}")
            weight = self._residual(m, weight, conv)
        if mag is None and not (m.embedding or conv) and weight.is_contiguous():
            # plain LoRA: one BLAS call, W += s·(B @ A) in place (no delta temporary, no extra passes)
            return weight.addmm_(B[rows], A, alpha=s)
        if m.embedding or conv:
            # stored [A's columns, B's rows]: Δ[rows] = ((B @ A)ᵀ)[rows] = A[:, rows]ᵀ @ Bᵀ, computed directly in
            # row-major layout. Layout matters beyond memory: torch's norm reduces in memory order, and only a
            # row-major result reproduces PEFT's DoRA norms bit for bit.
            delta = A[:, rows].T @ B.T
        else:
            delta = B[rows] @ A
        delta.mul_(s)
        merged = delta.add_(weight)  # == weight + delta (IEEE addition commutes), reusing the delta buffer
        if mag is None:
            return merged
        if m.embedding or conv:
            # norm per stored column, over all rows: needs the whole tensor
            if n != full_rows:
                raise ValueError(
                    f"internal: apply('{name}'): DoRA on this tensor needs the whole tensor (is_row_local is False), "
                    f"got rows {row_start}..{row_start + n} of {full_rows}"
                )
            norm = torch.linalg.norm(merged, dim=0)
            return merged.mul_((mag / norm).view(1, -1))
        norm = torch.linalg.norm(merged, dim=1)
        return merged.mul_((mag[rows] / norm).view(-1, 1))
