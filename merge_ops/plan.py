"""From a validated config to a complete, checked plan of every output tensor — before any tensor byte is read.

The plan knows each output tensor's name, shape and dtype, which input tensors feed it and every parameter value, so
that (1) all errors surface before heavy work (missing tensors, shape mismatches, bad parameter values) and (2) the
writer can lay out every shard and write its header first.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from .lazy_torch import torch

from .config import MergeConfig
from .errors import ConfigError, InputError, UnsupportedError
from .methods import get_method
from .methods.base import MergeMethod, TensorTask
from .params import check_merge_settings, resolve_param
from .lazy_torch import CpuDevice
from .safetensors_io import TORCH_TO_ST
from .sources import ModelSource

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")
DTYPE_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def with_layer(name: str, new_index: int) -> str:
    m = LAYER_RE.search(name)
    assert m is not None
    return name[: m.start(1)] + str(new_index) + name[m.end(1):]


def natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class InputRef:
    source: int  # index into MergePlan.sources
    tensor: str  # tensor name in that source


@dataclass
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code of the output
    base: InputRef | None
    inputs: list[InputRef]
    task: TensorTask | None  # None when the tensor is copied
    copy_from: InputRef | None = None  # byte copy (or cast) of one input, no method involved

    @property
    def nbytes(self) -> int:
        from .safetensors_io import element_size
        n = 1
        for d in self.shape:
            n *= d
        return n * element_size(self.dtype)


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    sources: list[ModelSource]
    donor: int
    tensors: list[OutputTensor]
    out_config: dict[str, Any]
    tokenizer_source: ModelSource | None
    compute_dtype_name: str
    warnings: list[str] = field(default_factory=list)

    @property
    def compute_dtype(self) -> "torch.dtype":
        return getattr(torch, self.compute_dtype_name)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class _Slot:
    """One input of one slice: which source, its layer offset, its parameters."""

    source: int
    start: int | None
    params: dict[str, Any]
    label: str


def build_plan(cfg: MergeConfig, *, allow_pickle: bool = False, download: bool = False, seed: int = 0,
               device: torch.device | None = None, compute_dtype: torch.dtype | None = None,
               sources: dict[str, ModelSource] | None = None) -> MergePlan:
    method_cls = get_method(cfg.merge_method)
    # -- parameters are checked before any file is opened ------------------------------------------------------------
    check_merge_settings(method_cls, cfg.parameters, cfg.models, cfg.slices)
    for spec in method_cls.params:
        if spec.required and spec.scope == "global" and spec.name not in cfg.parameters and not (
                cfg.slices and all(spec.name in s.parameters for s in cfg.slices)):
            raise ConfigError(f"parameters.{spec.name}: required by merge_method '{method_cls.name}' but not set")
    if method_cls.base == "required" and not cfg.base_model and not any(s.base_model for s in cfg.slices or []):
        raise ConfigError(f"base_model: merge_method '{method_cls.name}' needs a base_model")
    _check_arity(cfg, method_cls)

    # -- open every input (headers only) -----------------------------------------------------------------------------
    refs = cfg.all_model_refs()
    opened: list[ModelSource] = []
    index: dict[str, int] = {}
    for r in refs:
        src = (sources or {}).get(r) or ModelSource.open(r, allow_pickle=allow_pickle, download=download)
        index[r] = len(opened)
        opened.append(src)
    _check_model_configs(opened)
    _check_architectures(opened)

    compute = (str(compute_dtype).replace("torch.", "") if compute_dtype is not None else
               ("float64" if cfg.dtype == "float64" else "float32"))
    if compute not in ("float32", "float64"):
        raise ConfigError(f"compute dtype '{compute}': expected float32 or float64")
    method = method_cls()
    dev = device or CpuDevice()
    warnings: list[str] = []
    if cfg.models is not None:
        donor = index[cfg.base_model] if cfg.base_model else index[cfg.models[0].model]
        if opened[donor].checkpoint.num_layers is None and _uses_gradient(cfg):
            _no_layer_count(opened[donor], "a gradient parameter (a list of values sampled along the layers)")
        slots_nb = [_Slot(index[m.model], None, m.parameters, m.model) for m in cfg.models]
        base_ref = cfg.base_model if method_cls.base != "none" else None
        base_slot = _Slot(index[base_ref], None, {}, base_ref) if base_ref else None
        if base_ref:
            slots_nb = [s for s in slots_nb if s.source != base_slot.source]
        slices = [(base_slot, slots_nb, {}, None)]
    else:
        first = cfg.slices[0]
        donor_ref = first.base_model or cfg.base_model or first.sources[0].model
        donor = index[donor_ref]
        if opened[donor].checkpoint.num_layers is None:
            _no_layer_count(opened[donor], "slices (the output's num_hidden_layers is the sum of the layer ranges)")
        slices = []
        for k, s in enumerate(cfg.slices):
            base_ref = (s.base_model or cfg.base_model) if method_cls.base != "none" else None
            base_slot = None
            nb = []
            for j, src in enumerate(s.sources):
                _check_layer_range(opened[index[src.model]], src.layer_range, f"slices[{k}].sources[{j}]")
                slot = _Slot(index[src.model], src.layer_range[0], src.parameters, src.model)
                if base_ref and src.model == base_ref:
                    base_slot = slot
                else:
                    nb.append(slot)
            if base_ref and base_slot is None:
                raise ConfigError(
                    f"slices: base model '{base_ref}' must be one of the slice's sources (with a layer_range) "
                    f"for merge_method '{method_cls.name}'")
            slices.append((base_slot, nb, s.parameters, s.sources[0].layer_range))

    donor_src = opened[donor]
    tensors: list[OutputTensor] = []
    out_layers = donor_src.checkpoint.num_layers
    planner = _Planner(cfg, method, opened, dev, compute, seed, warnings)
    names = sorted(donor_src.checkpoint.tensors, key=natural_key)
    if cfg.models is not None:
        base_slot, nb, slice_params, _ = slices[0]
        n_layers = out_layers or 1
        for name in names:
            li = layer_index(name)
            t = 0.0 if li is None else (li / (n_layers - 1) if n_layers > 1 else 1.0)
            tensors.append(planner.output(name, name, base_slot, nb, slice_params, t, donor))
    else:
        non_layer = [n for n in names if layer_index(n) is None]
        pre = [n for n in non_layer if any(h in n for h in PRE_HINTS)]
        post = [n for n in non_layer if n not in pre]
        out_i = 0
        layer_map: list[int] = []  # output layer -> donor-side source layer (for per-layer config lists)
        for name in pre:
            base_slot, nb, sp, _ = slices[0]
            tensors.append(planner.output(name, name, _whole(base_slot), [_whole(s) for s in nb], sp, 0.0, donor))
        for k, (base_slot, nb, sp, rng) in enumerate(slices):
            n = rng[1] - rng[0]
            lead = base_slot or nb[0]
            lead_src = opened[lead.source]
            for j in range(n):
                src_layer = lead.start + j
                layer_names = sorted((nm for nm in lead_src.checkpoint.tensors if layer_index(nm) == src_layer),
                                     key=natural_key)
                if not layer_names:
                    raise InputError(f"slices[{k}]: model '{lead.label}' has no tensors for layer {src_layer} "
                                     f"(layer_range {list(rng)}; it has {lead_src.checkpoint.num_layers} layers)")
                t = j / (n - 1) if n > 1 else 1.0
                for nm in layer_names:
                    out_name = with_layer(nm, out_i)

                    def remap(slot: _Slot | None) -> _Slot | None:
                        return None if slot is None else _Slot(slot.source, slot.start + j, slot.params, slot.label)

                    tensors.append(planner.output(out_name, nm, remap(base_slot), [remap(s) for s in nb], sp, t,
                                                  lead.source, layer_of_lead=src_layer))
                layer_map.append(src_layer)
                out_i += 1
        for name in post:
            base_slot, nb, sp, _ = slices[-1]
            tensors.append(planner.output(name, name, _whole(base_slot), [_whole(s) for s in nb], sp, 0.0, donor))
        out_layers = out_i
    # what adapters did beyond W + s·B·A (tied embeddings, residual inits, renamed modules) goes first
    warnings[:0] = [n for src in opened for n in getattr(getattr(src, "adapter", None), "notes", [])]
    out_names = {t.name for t in tensors}
    for src in opened:
        head = getattr(getattr(src, "adapter", None), "untied_head", None)
        if head and head not in out_names:
            warnings.append(f"model '{src.label}': its adapter unties '{head}' from the input embedding, but the output "
                            f"follows '{donor_src.label}', which ties them: that '{head}' is not in the output (make "
                            f"'{src.label}' the base_model / first model to keep it)")
    out_config = _output_config(donor_src, cfg, tensors, out_layers, None if cfg.models is not None else layer_map)
    tok = _tokenizer_source(cfg, opened, index, donor, allow_pickle, download)
    return MergePlan(cfg, method, opened, donor, tensors, out_config, tok, compute, warnings)


def _whole(slot: _Slot | None) -> _Slot | None:
    return None if slot is None else _Slot(slot.source, None, slot.params, slot.label)


class _Planner:
    def __init__(self, cfg: MergeConfig, method: MergeMethod, sources: list[ModelSource], device: torch.device,
                 compute: torch.dtype, seed: int, warnings: list[str]):
        self.cfg, self.method, self.sources = cfg, method, sources
        self.device, self.compute, self.seed, self.warnings = device, compute, seed, warnings

    def _name_in(self, slot: _Slot, name: str, layer_of_lead: int | None) -> str:
        if slot.start is None or layer_of_lead is None:
            return name
        return with_layer(name, slot.start)

    def output(self, out_name: str, name: str, base_slot: _Slot | None, nb: list[_Slot], slice_params: dict,
               t: float, lead: int, layer_of_lead: int | None = None) -> OutputTensor:
        cfg, method = self.cfg, self.method
        lead_src = self.sources[lead]
        info = lead_src.info(name)
        shape = info.shape
        # an adapter's full copy of a tensor (modules_to_save, base_layer) is loaded into the base parameter by PEFT,
        # so the output keeps the base tensor's dtype, not the copy's
        own = lead_src.checkpoint.tensors.get(name, info)
        out_dtype = DTYPE_TO_ST[cfg.out_dtype or cfg.dtype] if (cfg.out_dtype or cfg.dtype) else (
            own.dtype if own.is_float else info.dtype)
        if not info.is_float:
            return OutputTensor(out_name, shape, info.dtype, None, [], None, copy_from=InputRef(lead, name))

        def ref(slot: _Slot) -> InputRef | None:
            src = self.sources[slot.source]
            tname = self._name_in(slot, name, layer_of_lead)
            if not src.has(tname):
                return None
            other = src.info(tname)
            if not other.is_float:
                raise InputError(
                    f"tensor '{tname}': dtype {other.dtype} in model '{slot.label}' but {info.dtype} in model "
                    f"'{lead_src.label}'; only floating-point tensors can be merged (the checkpoints do not match)")
            if other.shape != shape:
                raise InputError(
                    f"tensor '{tname}': shape {list(other.shape)} in model '{slot.label}' differs from {list(shape)} in "
                    f"model '{lead_src.label}'; these models cannot be merged tensor by tensor"
                    + (" (different vocabulary sizes: resize the embeddings of one model first)"
                       if any(h in tname for h in PRE_HINTS) or "lm_head" in tname else "")
                )
            return InputRef(slot.source, tname)

        base = None
        if base_slot is not None:
            base = ref(base_slot)
            if base is None:
                raise InputError(f"tensor '{name}' is missing from base model '{base_slot.label}'")
        inputs, used = [], []
        for slot in nb:
            r = ref(slot)
            if r is None:
                self.warnings.append(f"tensor '{name}' is missing from model '{slot.label}'; merged without it")
                continue
            inputs.append(r)
            used.append(slot)
        enough = len(inputs) >= method.min_models
        if not enough:
            fallback = base or (inputs[0] if inputs else None) or InputRef(lead, name)
            if len(nb) >= method.min_models:
                self.warnings.append(f"tensor '{name}': too few models have it for '{method.name}'; copied from "
                                     f"'{self.sources[fallback.source].label}'")
            return OutputTensor(out_name, shape, out_dtype, None, [], None, copy_from=fallback)

        cls = type(method)
        glob_levels = [("slice", slice_params), ("parameters", cfg.parameters)]
        params = {s.name: resolve_param(s, glob_levels, name, t, f"merge '{cls.name}'")
                  for s in cls.params if s.scope == "global"}
        model_params = []
        for slot in used:
            levels = [("model", slot.params)] + glob_levels
            model_params.append({s.name: resolve_param(s, levels, name, t, f"model '{slot.label}'")
                                 for s in cls.params if s.scope == "model"})
        task = TensorTask(name=out_name, shape=shape, has_base=base is not None, model_params=model_params,
                          params=params, seed=self.seed, compute_dtype_name=self.compute, device=self.device,
                          model_labels=[s.label for s in used])
        method.check_task(task)
        ident = method.is_identity(task)
        if ident is not None:
            src_ref = base if ident == -1 else inputs[ident]
            return OutputTensor(out_name, shape, out_dtype, None, [], None, copy_from=src_ref)
        return OutputTensor(out_name, shape, out_dtype, base, inputs, task)


def _check_model_configs(sources: list[ModelSource]) -> None:
    """Every input must be a Hugging Face model directory with a config.json that names its architecture: the output's
    config comes from one of them, and the architecture check needs all of them (MergeKit refuses these too)."""
    for s in sources:
        ck = s.checkpoint
        conf = ck.path / "config.json"
        if not conf.is_file():
            who = f"model '{s.label}'" + (f" ({ck.path})" if s.label != str(ck.path) else "")
            raise InputError(
                f"{who}: config.json is missing; every merge input must be a Hugging Face model "
                f"directory with its config.json (copy it from the model's original repository)")
        if not ck.config.get("model_type") and not ck.config.get("architectures"):
            raise InputError(
                f"model '{s.label}': {conf} has neither 'model_type' nor 'architectures', so its architecture cannot "
                f"be checked against the other inputs (and transformers could not load the result); add "
                f"\"model_type\" (e.g. \"llama\") from the model's original config")


def _no_layer_count(src: ModelSource, why: str) -> None:
    raise InputError(
        f"model '{src.label}': {src.checkpoint.path / 'config.json'} has no integer num_hidden_layers (nor n_layer "
        f"/ num_layers), which {why} needs; add it to config.json")


def _uses_gradient(cfg: MergeConfig) -> bool:
    """Whether any parameter value is a gradient (a list of 2+ numbers, possibly inside a filtered entry)."""
    from .config import FilteredValue

    def grad(v: Any) -> bool:
        if isinstance(v, list):
            if v and isinstance(v[0], FilteredValue):
                return any(grad(e.value) for e in v)
            return len(v) > 1
        return False

    levels = [cfg.parameters] + [m.parameters for m in cfg.models or []]
    for sl in cfg.slices or []:
        levels += [sl.parameters] + [x.parameters for x in sl.sources]
    return any(grad(v) for level in levels for v in level.values())


def _check_layer_range(src: ModelSource, rng: tuple[int, int], where: str) -> None:
    """A slice source's layer_range must lie inside its model (a source past the end would otherwise just be
    missing from the merge, with a warning, instead of failing)."""
    n = src.checkpoint.num_layers
    if n is None:
        idx = [layer_index(t) for t in src.checkpoint.tensors]
        n = max((i for i in idx if i is not None), default=-1) + 1
    if rng[1] > n:
        raise ConfigError(
            f"{where}.layer_range {list(rng)} is past the end of model '{src.label}', which has {n} layers "
            f"(a layer_range is [start, end) with 0 <= start < end <= {n})")


def _check_arity(cfg: MergeConfig, method_cls: type[MergeMethod]) -> None:
    if cfg.models is not None:
        has_base = bool(cfg.base_model) and method_cls.base != "none"
        nb = [m for m in cfg.models if not (has_base and m.model == cfg.base_model)]
        msg = method_cls.check_arity(len(nb), has_base)
        if msg:
            raise ConfigError(f"models: {msg}")
        return
    for k, s in enumerate(cfg.slices or []):
        base_ref = s.base_model or cfg.base_model
        has_base = bool(base_ref) and method_cls.base != "none"
        if has_base and method_cls.base == "required" and base_ref not in [x.model for x in s.sources]:
            raise ConfigError(
                f"slices[{k}].sources: base model '{base_ref}' must be one of the slice's sources (with a layer_range) "
                f"for merge_method '{method_cls.name}'; add it to the slice's sources or change base_model")
        nb = [x for x in s.sources if not (has_base and x.model == base_ref)]
        msg = method_cls.check_arity(len(nb), has_base)
        if msg:
            raise ConfigError(f"slices[{k}].sources: {msg}")


def _check_architectures(sources: list[ModelSource]) -> None:
    archs = {}
    for s in sources:
        a = s.checkpoint.architecture
        if a:
            archs.setdefault(a, []).append(s.label)
    if len(archs) > 1:
        desc = "; ".join(f"{a}: {', '.join(labels)}" for a, labels in archs.items())
        raise InputError(f"the models have different architectures ({desc}); only models of one architecture can be merged")


def _output_config(donor: ModelSource, cfg: MergeConfig, tensors: list[OutputTensor], out_layers: int | None,
                   layer_map: list[int] | None) -> dict[str, Any]:
    conf = copy.deepcopy(donor.checkpoint.config)
    dtypes = {t.dtype for t in tensors if t.dtype in ("F32", "F16", "BF16", "F64")}
    inv = {v: k for k, v in DTYPE_TO_ST.items()}
    if cfg.out_dtype or cfg.dtype:
        name = cfg.out_dtype or cfg.dtype
    elif len(dtypes) == 1:
        name = inv[dtypes.pop()]
    else:
        name = conf.get("torch_dtype") or conf.get("dtype")
    if name:
        if "dtype" in conf or "torch_dtype" not in conf:
            conf["dtype"] = name
        if "torch_dtype" in conf:
            conf["torch_dtype"] = name
    if layer_map is not None:
        old = donor.checkpoint.num_layers
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in conf:
                conf[key] = len(layer_map)
        # per-layer lists (e.g. Qwen3 `layer_types`) follow the layers they describe
        for key, value in list(conf.items()):
            if isinstance(value, list) and old and len(value) == old and key != "architectures":
                conf[key] = [value[i] if i < len(value) else value[-1] for i in layer_map]
    return conf


def _tokenizer_source(cfg: MergeConfig, sources: list[ModelSource], index: dict[str, int], donor: int,
                      allow_pickle: bool, download: bool) -> ModelSource | None:
    choice = cfg.tokenizer_from
    if choice == "base":
        return sources[donor]
    if choice == "union":
        raise UnsupportedError("tokenizer_source: 'union' (merging vocabularies) is not supported; use 'base' or name "
                               "the model whose tokenizer to copy")
    if choice in index:
        src = sources[index[choice]]
    else:
        from .references import parse_ref, resolve_path

        ref = parse_ref(choice)
        path = resolve_path(ref.model, ref.revision, label="tokenizer_source", download=download)
        if not path.is_dir():
            raise InputError(f"tokenizer_source: '{choice}' is a file; give the model directory that holds the tokenizer")
        from .checkpoint import Checkpoint

        src = ModelSource(ref, Checkpoint(path, {}, {}, []))
    if not src.checkpoint.tokenizer_files():  # asked for explicitly, so an output without a tokenizer is a mistake
        raise InputError(f"tokenizer_source: '{choice}' ({src.checkpoint.path}) has no tokenizer files (tokenizer.json, "
                         f"tokenizer.model, tokenizer_config.json, ...); name a model that has them, or use 'base'")
    return src
