"""Python API of the merge engine: :func:`merge` (a MergeKit-style config) and :func:`merge_lora` (adapter into base).

Both validate everything first (config, files, headers, shapes, parameters), then stream the merge into a temporary
directory that is renamed into place only when complete. The Dagster assets and the CLI call these functions.
"""

from __future__ import annotations

import json
import resource
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .lazy_torch import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import MergeConfig, load_config, parse_config
from .device import describe, resolve_device, use_all_cores
from .errors import ConfigError, InputError
from .executor import Executor, block_sizes, layout_shards
from .bnb_dequant import quant_manifest
from .hashing import sha256_files
from .manifest import library_versions, model_card, write_manifest
from .output_dir import atomic_output_dir, check_output_dir
from .plan import MergePlan, build_plan
from .sources import ModelSource
from .units import parse_size

INDEX_NAME = "model.safetensors.index.json"


class MergeOptions(BaseModel):
    """How to run a merge (not what to merge)."""

    model_config = ConfigDict(extra="forbid")
    device: str = "auto"
    seed: int = 0
    shard_size: int = Field(default=5 * 10**9, description="bytes per output shard")
    allow_pickle: bool = False
    download: bool = False
    compute_dtype: str | None = Field(default=None, description="float32 (default) or float64")
    chunk_elements: int | None = Field(default=None, description="elements per row block (default 2 Mi; on a GPU "
                                                                  "up to 64 Mi for methods with statistics passes)")
    cache_bytes: int | None = Field(default=None, description="raw inputs of a tensor up to this size are read whole "
                                                              "by the prefetch thread (default 16 MiB; on a GPU 512 MiB for "
                                                              "methods with statistics passes)")
    hash_inputs: bool = True
    copy_tokenizer: bool = True
    fsync: bool = Field(default=False, description="fsync every shard before the rename (durable across power loss)")
    check_finite: bool = Field(default=False, description="count NaN/inf values in every output tensor while writing "
                                                          "(one pass over the bytes in the writer thread) and fail, "
                                                          "naming the tensors, if there are any")
    out_quant: str | None = Field(default=None, description="nf4 or fp4: quantize the merge result to a bitsandbytes "
                                                            "4-bit checkpoint (merge_ops.bnb_export)")

    @field_validator("out_quant")
    @classmethod
    def _oq(cls, v):
        if v is not None and v.lower() not in ("nf4", "fp4"):
            raise ValueError("out_quant must be nf4 or fp4")
        return v.lower() if v else v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v) if isinstance(v, str) else v

    @field_validator("compute_dtype")
    @classmethod
    def _cdt(cls, v):
        if v not in (None, "float32", "float64"):
            raise ValueError("compute_dtype must be float32 or float64")
        return v


@dataclass
class MergeResult:
    output_dir: Path
    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    device: str
    shards: list[str]
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"merged {self.tensors} tensors, {self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s on {self.device}; "
                f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB -> {self.output_dir}")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _as_config(config: MergeConfig | dict | str | Path) -> tuple[MergeConfig, str]:
    if isinstance(config, MergeConfig):
        return config, "<config>"
    if isinstance(config, dict):
        return parse_config(config), "<config>"
    return load_config(config), str(config)


def plan_merge(config: MergeConfig | dict | str | Path, options: MergeOptions | None = None,
               sources: dict[str, ModelSource] | None = None) -> MergePlan:
    """Validate and plan without computing anything (what ``mergeline merge --dry-run`` prints)."""
    options = options or MergeOptions()
    cfg, where = _as_config(config)
    return _plan(cfg, where, options, sources)


def _plan(cfg: MergeConfig, where: str, options: MergeOptions, sources: dict[str, ModelSource] | None) -> MergePlan:
    device = resolve_device(options.device)
    cdt = options.compute_dtype if options.compute_dtype in ("float64", "float32") else None
    try:
        return build_plan(cfg, allow_pickle=options.allow_pickle, download=options.download, seed=options.seed,
                          device=device, compute_dtype=cdt, sources=sources)
    except ConfigError as e:  # config-level errors found while planning: say which file they are about
        if where != "<config>" and not str(e).startswith(where):
            raise ConfigError(f"{where}: {e}") from None
        raise


def merge(config: MergeConfig | dict | str | Path, output_dir: str | Path, options: MergeOptions | None = None,
          *, progress: Callable[[int, int], None] | None = None, relation: str = "merge",
          sources: dict[str, ModelSource] | None = None, _final_target: Path | None = None) -> MergeResult:
    """Merge models as the config says and write a complete Hugging Face model directory to ``output_dir``."""
    options = options or MergeOptions()
    if options.out_quant:
        return _merge_then_quantize(config, output_dir, options, progress=progress, relation=relation,
                                    sources=sources)
    start = time.perf_counter()
    check_output_dir(output_dir)  # the output-side mistakes first: cheaper than opening (or unpickling) inputs
    cfg, where = _as_config(config)
    use_all_cores()
    plan = _plan(cfg, where, options, sources)
    device = resolve_device(options.device)
    if options.shard_size <= 0:
        raise ConfigError(f"shard size must be positive, got {options.shard_size}")
    inputs = [p for s in plan.sources for p in _source_dirs(s)]
    check_output_dir(output_dir, inputs)
    if _final_target is not None:  # out_quant: the bnb export's target must not be an input either
        check_output_dir(_final_target, inputs)

    # input hashes in the background (cached; overlaps the merge)
    hashes: dict[str, str] = {}
    files = sorted({str(p) for s in plan.sources for p in s.input_files()})

    def hash_inputs() -> None:
        hashes.update(sha256_files([Path(f) for f in files]))

    hasher = threading.Thread(target=hash_inputs, name="mergeline-hash-inputs", daemon=True)
    if options.hash_inputs:
        hasher.start()

    shards = layout_shards(plan.tensors, options.shard_size)
    total = len(plan.tensors)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    with atomic_output_dir(output_dir) as tmp:
        for src in plan.sources:  # 4-bit inputs: their float32 view is written now, after every check passed
            src.checkpoint.materialize()
        bs = block_sizes(device, options.chunk_elements, options.cache_bytes)
        ex = Executor(plan, chunk_elements=bs.chunk_elements, cache_bytes=bs.cache_bytes,
                      stats_chunk_elements=bs.stats_chunk_elements, stats_cache_bytes=bs.stats_cache_bytes, progress=tick,
                      fsync=options.fsync, check_finite=options.check_finite)
        ex.run(tmp, shards)
        if ex.nonfinite:
            worst = sorted(ex.nonfinite.items(), key=lambda kv: -kv[1])
            listed = ", ".join(f"'{n}' ({c})" for n, c in worst[:5]) + (f" and {len(worst) - 5} more" if len(worst) > 5 else "")
            raise InputError(
                f"the merge result holds NaN/inf values in {len(worst)} tensor(s): {listed}; nothing was written. "
                f"An input model or adapter holds NaN/inf there, or the parameters overflow (check the weights)")
        index = {"metadata": {"total_size": plan.total_bytes},
                 "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
        if options.copy_tokenizer and plan.tokenizer_source is not None:
            for f in plan.tokenizer_source.checkpoint.tokenizer_files():
                shutil.copy2(f, tmp / f.name)
        if cfg.chat_template:
            _set_chat_template(tmp, cfg.chat_template)
        if options.hash_inputs:
            hasher.join()
        seconds = time.perf_counter() - start
        config_dump = cfg.model_dump(mode="json", exclude_none=True, by_alias=True)
        manifest = {
            "mergeline_manifest": 1,
            "kind": relation,
            "config": config_dump,
            "method": cfg.merge_method,
            "seed": options.seed,
            "compute_dtype": plan.compute_dtype_name,
            "device": describe(device),
            "inputs": [{"reference": s.label, **s.paths} for s in plan.sources],
            "input_sha256": hashes,
            "output_shards": {s.filename: {"sha256": s.sha256, "bytes": s.nbytes, "tensors": len(s.tensors)}
                              for s in shards},
            "tensors": len(plan.tensors),
            "total_bytes": plan.total_bytes,
            "warnings": plan.warnings,
            **({"checked_finite": True} if options.check_finite else {}),
            **quant_manifest(plan.sources),
            "versions": library_versions(),
            "seconds": round(seconds, 3),
        }
        write_manifest(tmp, manifest)
        bases = [s.label for s in plan.sources]
        summary = (f"This model was made by merging {', '.join(f'`{b}`' for b in bases)} with the "
                   f"`{cfg.merge_method}` method.")
        (tmp / "README.md").write_text(model_card(bases, relation, yaml.safe_dump(config_dump, sort_keys=False), summary))
    return MergeResult(Path(output_dir), len(plan.tensors), plan.total_bytes, time.perf_counter() - start,
                       peak_rss_bytes(), describe(device), [s.filename for s in shards], plan.warnings, manifest)


def _source_dirs(src: ModelSource) -> list[Path]:
    dirs = [src.checkpoint.path]
    if src.adapter is not None:
        dirs.append(src.adapter.path)
    return dirs


def _merge_then_quantize(config, output_dir: str | Path, options: MergeOptions, **kw: Any) -> MergeResult:
    """``out_quant``: merge into a hidden float directory next to the target, then stream it through the bnb 4-bit
    exporter into ``output_dir`` (atomic as ever); the manifest keeps the merge's and records the requantization."""
    import tempfile

    from .bnb_export import export_bnb

    target = check_output_dir(output_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output '{target}': cannot create its parent directory ({e.strerror})") from e
    inner = options.model_copy(update={"out_quant": None})
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.float-", dir=target.parent) as td:
        res = merge(config, Path(td) / "merged", inner, _final_target=target, **kw)
        ex = export_bnb(Path(td) / "merged", target, options.out_quant,
                        extra_manifest={"merge": res.manifest,
                                        "requantized": f"merge output ({res.manifest.get('config', {}).get('dtype') or 'source dtype'}) → {options.out_quant}",
                                        **{k: res.manifest[k] for k in ("dequantized", "adapter_bases") if k in res.manifest}})
    res.output_dir = Path(output_dir)
    res.manifest = ex.manifest
    res.shards = list(ex.shards)
    res.bytes = ex.bytes
    res.seconds = res.seconds + ex.seconds
    res.peak_rss_bytes = peak_rss_bytes()
    return res


def merge_lora(base: str | Path, adapter: str | Path, output_dir: str | Path, options: MergeOptions | None = None,
               *, progress: Callable[[int, int], None] | None = None, out_dtype: str | None = None) -> MergeResult:
    """Merge a PEFT LoRA adapter into its base model (W + s·B·A per targeted module), PEFT semantics."""
    options = options or MergeOptions()
    check_output_dir(output_dir)  # before the adapter's matrices are read
    src = ModelSource.from_parts(base, adapter, allow_pickle=options.allow_pickle)
    src.round_to_stored = False  # the adapted weights are the output: rounded once, to the output dtype
    label = src.label
    cfg = {"merge_method": "passthrough", "models": [{"model": label}]}
    if out_dtype:
        cfg["dtype"] = out_dtype
    return merge(cfg, output_dir, options, progress=progress, relation="finetune", sources={label: src})


def _set_chat_template(out: Path, template: str) -> None:
    """Record a chat template in tokenizer_config.json (a built-in name like 'chatml' or a Jinja string)."""
    builtin = {
        "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    }
    if template in ("auto", "base"):
        return
    text = builtin.get(template, template)
    if "{" not in text:
        raise ConfigError(f"chat_template: '{template}' is neither a known template name (chatml, auto) nor a Jinja template")
    path = out / "tokenizer_config.json"
    conf = json.loads(path.read_text()) if path.exists() else {}
    conf["chat_template"] = text
    path.write_text(json.dumps(conf, indent=2) + "\n")
