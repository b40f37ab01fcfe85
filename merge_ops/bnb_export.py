"""bitsandbytes 4-bit (NF4 / FP4) export of a Hugging Face checkpoint, streamed tensor by tensor.

The output is what ``transformers`` itself writes for a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``
and saved with ``save_pretrained``: each quantized Linear weight ``W`` becomes ``W`` (uint8, two 4-bit codes per byte,
shape ``[ceil(n/2), 1]``), ``W.absmax``, ``W.quant_map``, with double quantization also ``W.nested_absmax`` and
``W.nested_quant_map``, and ``W.quant_state.bitsandbytes__nf4|fp4`` (the JSON of the non-tensor state as bytes);
``config.json`` gains ``quantization_config``. So ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it with no
extra arguments.

Why not quantize with transformers and ``save_pretrained``: that holds the whole model in memory. Here one source
tensor is read (``pread``, no mmap) and quantized at a time, and each shard's header is written before its tensors,
so peak memory is bounded by the largest single weight, not the model size. Which modules are quantized is decided
exactly as transformers' bnb quantizer decides (nn.Linear modules, minus tied weights, the output embedding and the
last module, minus ``_keep_in_fp32_modules`` and any ``skip_modules``), on a meta-device instance of the model
(no weights allocated, no remote code).

One deviation in bytes, not in meaning: with double quantization the quant-state JSON holds ``nested_offset``, a
float known only after quantizing, but a streamed shard's header (which fixes every tensor's byte length) is
written first. The JSON is therefore padded with trailing spaces to a fixed reserved length; ``json.loads`` (used by
bitsandbytes to read it) ignores trailing whitespace.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from .lazy_torch import torch
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint import Checkpoint
from .errors import ConfigError, InputError, UnsupportedError
from .output_dir import atomic_output_dir
from .plan import natural_key
from .safetensors_io import PlannedTensor, ShardStreamWriter, TensorInfo, read_tensor
from .units import parse_size

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
INDEX_NAME = "model.safetensors.index.json"
MANIFEST = "mergeline.json"
#: a float32 ``.item()`` repr is at most this long ("-1.2345678901234567e-38"); reserve room for it
_OFFSET_PLACEHOLDER = -1.2345678901234567e-38


class BnbExportOptions(BaseModel):
    """How to quantize. Defaults follow ``transformers.BitsAndBytesConfig(load_in_4bit=True)`` except the compute
    dtype, which defaults to the source model's dtype (what one usually wants for inference)."""

    model_config = ConfigDict(extra="forbid")
    quant: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(False, description="quantize the absmax statistics too (QLoRA's double quantization)")
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    blocksize: Literal[64, 128, 256, 512, 1024, 2048, 4096] = 64
    skip_modules: list[str] = Field(default_factory=list, description="extra module names to keep unquantized")
    shard_size: int = 5 * 10**9
    device: str = Field("cpu", description="where quantize_4bit runs: cpu (bitsandbytes' CPU backend) or cuda[:N]")

    @classmethod
    def coerce(cls, quant: str | None = None, **kw: Any) -> "BnbExportOptions":
        if isinstance(kw.get("shard_size"), str):
            kw["shard_size"] = parse_size(kw["shard_size"])
        if quant is not None:
            q = quant.lower()
            if q not in QUANT_TYPES:
                raise ConfigError(f"bnb quant type '{quant}' is not supported; use one of {', '.join(QUANT_TYPES)}"
                                  + (" (8-bit LLM.int8 export is not implemented)" if q == "int8" else ""))
            kw["quant"] = q
        return cls(**kw)


@dataclass
class ExportResult:
    """What an export produced; ``sha256`` identifies the content (shard hashes + config), ``compression_ratio``
    is source weight bytes / output weight bytes."""

    path: Path
    quant: str
    architecture: str | None
    tensor_count: int
    quantized_tensors: int
    bytes: int
    source_bytes: int
    compression_ratio: float
    sha256: str
    seconds: float
    peak_rss_bytes: int
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"exported {self.quantized_tensors}/{self.tensor_count} weights to {self.quant}: "
                f"{self.source_bytes / 1e6:.1f} MB -> {self.bytes / 1e6:.1f} MB ({self.compression_ratio:.2f}x) in "
                f"{self.seconds:.1f} s; peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB -> {self.path}")


# -- which modules transformers would quantize ----------------------------------------------------------------------
def modules_to_quantize(model_dir: Path, config: dict[str, Any], skip_modules: list[str] | None = None,
                        ) -> tuple[set[str], list[str], list[str]]:
    """(names of nn.Linear modules transformers' bnb 4-bit quantizer would replace, notes, the modules it would
    not convert).

    Builds the model from ``config.json`` on the meta device and applies transformers' own selection
    (``get_modules_to_not_convert`` + ``should_convert_module``)."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        from transformers.quantizers.base import HfQuantizer
        from transformers.integrations.bitsandbytes import should_convert_module
    except ImportError as e:  # pragma: no cover - other transformers versions
        raise UnsupportedError(f"this transformers version does not expose the bnb quantizer helpers ({e})") from e
    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise InputError(f"{model_dir / 'config.json'}: transformers cannot read this config ({e})") from e
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except Exception as e:
        raise UnsupportedError(
            f"{model_dir}: cannot build architecture {config.get('architectures')} with transformers to decide which "
            f"modules to quantize ({type(e).__name__}: {e})") from e
    not_convert = HfQuantizer.get_modules_to_not_convert(model, skip_modules or None,
                                                         getattr(model, "_keep_in_fp32_modules", None),
                                                         add_default_skips=bool(skip_modules))
    out: set[str] = set()
    notes: list[str] = []
    for name, module in model.named_modules():
        if not name or not should_convert_module(name, not_convert):
            continue
        if isinstance(module, Conv1D):
            notes.append(f"{name}: GPT-2 style Conv1D kept unquantized (not supported by the streaming exporter)")
        elif type(module) is nn.Linear:
            out.add(name)
    return out, notes, sorted(not_convert)


# -- quant-state layout ---------------------------------------------------------------------------------------------
def _state_json(quant: str, blocksize: int, dtype: str, shape: tuple[int, ...], nested_offset: float | None) -> bytes:
    d: dict[str, Any] = {"quant_type": quant, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if nested_offset is not None:
        d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": nested_offset})
    return json.dumps(d).encode()


def quantized_parts(name: str, shape: tuple[int, ...], dtype: str, opts: BnbExportOptions) -> list[PlannedTensor]:
    """The serialized tensors of one quantized weight, shapes known before quantizing."""
    n = math.prod(shape)
    blocks = -(-n // opts.blocksize)
    parts = [PlannedTensor(name, "U8", ((n + 1) // 2, 1))]
    if opts.double_quant:
        parts += [PlannedTensor(f"{name}.absmax", "U8", (blocks,)),
                  PlannedTensor(f"{name}.nested_absmax", "F32", (-(-blocks // NESTED_BLOCKSIZE),)),
                  PlannedTensor(f"{name}.nested_quant_map", "F32", (256,))]
    else:
        parts.append(PlannedTensor(f"{name}.absmax", "F32", (blocks,)))
    parts.append(PlannedTensor(f"{name}.quant_map", "F32", (16,)))
    js = _state_json(opts.quant, opts.blocksize, dtype, shape, _OFFSET_PLACEHOLDER if opts.double_quant else None)
    parts.append(PlannedTensor(f"{name}.quant_state.bitsandbytes__{opts.quant}", "U8", (len(js),)))
    return parts


_ST_TO_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def quantize_weight(w: torch.Tensor, opts: BnbExportOptions, parts: list[PlannedTensor]) -> list[torch.Tensor]:
    """Quantize one weight with ``bitsandbytes.functional.quantize_4bit`` (CPU backend) and return its serialized
    tensors in the order of ``parts`` (the quant-state JSON padded to its planned length)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=opts.blocksize, compress_statistics=opts.double_quant,
                                       quant_type=opts.quant, quant_storage=torch.uint8)
    d = state.as_dict(packed=True)
    out = []
    for p in parts:
        t = packed if p is parts[0] else d[p.name[len(parts[0].name) + 1:]]
        t = t.contiguous().cpu()
        if p.name.endswith(f".quant_state.bitsandbytes__{opts.quant}"):
            raw = bytes(t.numpy())
            if len(raw) > p.shape[0]:
                raise RuntimeError(f"internal: quant state of '{parts[0].name}' is {len(raw)} bytes, reserved "
                                   f"{p.shape[0]}")
            t = torch.frombuffer(bytearray(raw + b" " * (p.shape[0] - len(raw))), dtype=torch.uint8)
        if tuple(t.shape) != p.shape or _st(t.dtype) != p.dtype:
            raise RuntimeError(f"internal: '{p.name}' is {tuple(t.shape)} {t.dtype}, planned {p.shape} {p.dtype}")
        out.append(t)
    return out


def _st(dtype: torch.dtype) -> str:
    from .safetensors_io import TORCH_TO_ST

    return TORCH_TO_ST[dtype]


def quantization_config(opts: BnbExportOptions, compute_dtype: str, skip: list[str] | None) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``, key for key what ``BitsAndBytesConfig.to_dict()`` writes."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": opts.quant,
        "bnb_4bit_use_double_quant": opts.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


# -- the export ---------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    source: TensorInfo
    parts: list[PlannedTensor]
    quantize: bool

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _plan(ckpt: Checkpoint, linear: set[str], opts: BnbExportOptions) -> list[_Item]:
    items = []
    for name in sorted(ckpt.tensors, key=natural_key):
        info = ckpt.tensors[name]
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        q = module in linear and len(info.shape) == 2 and info.dtype in _ST_TO_NAME
        if q:
            parts = quantized_parts(name, info.shape, _ST_TO_NAME[info.dtype], opts)
        else:
            parts = [PlannedTensor(name, info.dtype, info.shape)]
        items.append(_Item(info, parts, q))
    return items


def _layout(items: list[_Item], shard_size: int) -> list[list[_Item]]:
    from .executor import group_by_size

    return group_by_size(items, shard_size)


def export_bnb(model_dir: str | Path, out_dir: str | Path, quant: str = "nf4", *,
               options: BnbExportOptions | None = None, progress: Callable[[int, int], None] | None = None,
               extra_manifest: dict[str, Any] | None = None, **kw: Any) -> ExportResult:
    """Quantize ``model_dir`` (a safetensors HF checkpoint) to a bnb 4-bit checkpoint in ``out_dir``.

    ``kw`` are :class:`BnbExportOptions` fields (``double_quant``, ``compute_dtype``, ``blocksize``,
    ``skip_modules``, ``shard_size``); ``extra_manifest`` is merged into the written ``mergeline.json``."""
    from .api import peak_rss_bytes
    from .manifest import library_versions, write_manifest

    opts = options or BnbExportOptions.coerce(quant, **kw)
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    ckpt = Checkpoint.open(model_dir, label=str(model_dir))
    qc = ckpt.config.get("quantization_config") if not ckpt.dequantized else None
    if qc:
        raise InputError(f"{model_dir / 'config.json'}: the model is already quantized "
                         f"({qc.get('quant_method', '?')}); export from the 16-bit model")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UnsupportedError("bnb export needs the 'bitsandbytes' package (pip install bitsandbytes)") from None
    linear, notes, not_convert = modules_to_quantize(model_dir, ckpt.config, opts.skip_modules)
    if ckpt.dequantized:
        notes.append(f"input was a bnb 4-bit checkpoint ({ckpt.dequantized}); re-quantized from the dequantized weights")
    items = _plan(ckpt, linear, opts)
    ckpt.materialize()  # a 4-bit input: its float32 view
    n_q = sum(it.quantize for it in items)
    if n_q == 0:
        raise InputError(f"{model_dir}: no tensor to quantize (no nn.Linear weight found that bitsandbytes 4-bit would "
                         f"replace; architecture {ckpt.architecture})")
    groups = _layout(items, opts.shard_size)
    total = len(items)
    src_bytes = sum(it.source.nbytes for it in items)
    compute = opts.compute_dtype or _config_dtype(ckpt.config) or "float32"
    # transformers adds its default skips only when llm_int8_skip_modules is null: write the full list otherwise
    skip_list = not_convert if opts.skip_modules else None
    shards: dict[str, dict[str, Any]] = {}
    weight_map: dict[str, str] = {}
    done = 0
    with atomic_output_dir(out_dir) as tmp:
        for gi, group in enumerate(groups):
            fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
            planned = [p for it in group for p in it.parts]
            sw = ShardStreamWriter(tmp / fname, planned, {"format": "pt"})
            try:
                for it in group:
                    if it.quantize:
                        w = read_tensor(it.source)
                        if opts.device != "cpu":
                            w = w.to(opts.device)
                        for p, t in zip(it.parts, quantize_weight(w, opts, it.parts)):
                            sw.write(p.name, t)
                        del w
                    else:
                        sw.copy_from_file(it.source.name, it.source)
                    done += 1
                    if progress:
                        progress(done, total)
                sw.close()
            except BaseException:
                sw.abort()
                raise
            nbytes = sum(p.nbytes for p in planned)
            shards[fname] = {"sha256": sw.sha256.hexdigest(), "bytes": nbytes, "tensors": len(planned)}
            weight_map.update({p.name: fname for p in planned})
        out_bytes = sum(s["bytes"] for s in shards.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": out_bytes}, "weight_map": weight_map},
                                                 indent=2) + "\n")
        conf = dict(ckpt.config)
        conf.pop("quantization_config", None)
        conf["quantization_config"] = quantization_config(opts, compute, skip_list)
        config_text = json.dumps(conf, indent=2) + "\n"
        (tmp / "config.json").write_text(config_text)
        for f in ckpt.tokenizer_files() + [model_dir / "README.md"]:
            if f.is_file():
                shutil.copy2(f, tmp / f.name)  # tokenizer files and the model card travel with the weights
        import hashlib

        h = hashlib.sha256()
        for fname in sorted(shards):
            h.update(f"{fname}:{shards[fname]['sha256']}\n".encode())
        h.update(config_text.encode())
        digest = h.hexdigest()
        seconds = time.perf_counter() - t0
        ratio = src_bytes / out_bytes if out_bytes else 0.0
        manifest = {
            "mergeline_manifest": 1,
            "kind": "export",
            "export": {"type": "bnb", "quant": opts.quant, "double_quant": opts.double_quant,
                       "blocksize": opts.blocksize, "compute_dtype": compute,
                       "quantized_tensors": n_q, "tensors": total, "source": str(model_dir),
                       "source_bytes": src_bytes, "bytes": out_bytes, "compression_ratio": round(ratio, 4),
                       "sha256": digest, "notes": notes},
            "output_shards": shards,
            "versions": {**library_versions(), **_bnb_version()},
            "seconds": round(seconds, 3),
            **(extra_manifest or {}),
        }
        write_manifest(tmp, manifest)
    return ExportResult(Path(out_dir), opts.quant, ckpt.architecture, total, n_q, out_bytes, src_bytes, ratio,
                        digest, time.perf_counter() - t0, peak_rss_bytes(), shards, notes, manifest)


def _config_dtype(config: dict[str, Any]) -> str | None:
    d = config.get("dtype") or config.get("torch_dtype")
    return d if d in ("float32", "float16", "bfloat16") else None


def _bnb_version() -> dict[str, str]:
    from importlib import metadata

    try:
        return {"bitsandbytes": metadata.version("bitsandbytes")}
    except metadata.PackageNotFoundError:
        return {}
