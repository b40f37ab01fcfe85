"""Reading bitsandbytes 4-bit (NF4 / FP4) checkpoints as float32 merge inputs.

A pre-quantized bnb checkpoint stores each quantized Linear weight ``W`` as packed uint8 codes plus its quant state
(``W.absmax``, ``W.quant_map``, optionally ``W.nested_absmax``/``W.nested_quant_map`` for double quantization, and
``W.quant_state.bitsandbytes__nf4|fp4``, a JSON blob with the original shape and dtype). The merge engine needs plain
float tensors, so :func:`dequantize_checkpoint` lays out one temporary safetensors file holding every quantized weight
dequantized to float32 and returns tensor infos in which ``W`` points there (with its real shape) and the quant-state
tensors are gone; the file is written (one weight in memory at a time) only when the merge is about to run
(``Checkpoint.materialize``), so planning and validation stay header-only. Unquantized tensors (embeddings, norms, lm_head) keep pointing at
the original files. Everything is validated from the headers and the small quant-state blobs first, so a broken
quant state is reported (file and tensor named) before any weight is dequantized.

Dequantization is done here in torch (``code[nibble] * absmax[block]``, high nibble first; with double quant
``absmax = nested_code[absmax_u8] * nested_absmax[block256] + offset``), computed in float32 and never rounded to the
checkpoint's compute dtype, so the float32 result is what bitsandbytes' ``dequantize_4bit`` computes before its
final cast. Tests check it against bitsandbytes itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .lazy_torch import torch

from .errors import InputError, UnsupportedError
from .safetensors_io import PlannedTensor, ShardStreamWriter, TensorInfo, read_tensor

QS_MARK = ".quant_state.bitsandbytes__"
PART_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass
class QuantWeight:
    """One quantized weight: its serialized tensors and the parsed quant state."""

    name: str
    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, ...]
    packed: TensorInfo
    absmax: TensorInfo
    quant_map: TensorInfo
    nested_absmax: TensorInfo | None = None
    nested_quant_map: TensorInfo | None = None
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def part_names(self) -> list[str]:
        names = [self.name, f"{self.name}.absmax", f"{self.name}.quant_map",
                 f"{self.name}{QS_MARK}{self.quant_type}"]
        if self.nested_absmax is not None:
            names += [f"{self.name}.nested_absmax", f"{self.name}.nested_quant_map"]
        return names


def is_bnb_4bit(config: dict[str, Any], tensor_names) -> bool:
    """A bnb 4-bit checkpoint: ``quantization_config`` says so, or quant-state tensors are present."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes":
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            raise UnsupportedError("bitsandbytes 8-bit (LLM.int8) checkpoints cannot be merge inputs; use the 16-bit "
                                   "original model")
        return True
    if isinstance(qc, dict) and qc.get("quant_method"):
        raise UnsupportedError(f"the model is quantized with '{qc.get('quant_method')}' (config.json "
                               f"quantization_config); mergeline reads only bitsandbytes 4-bit checkpoints: use the "
                               f"16-bit original model")
    return any(QS_MARK in n for n in tensor_names)


def _fail(where: Path | str, name: str, what: str) -> InputError:
    return InputError(f"{where}: quantized weight '{name}': {what}; the bnb 4-bit checkpoint is corrupt or "
                      f"incomplete (re-export it, or use the original 16-bit model)")


def find_quant_weights(tensors: dict[str, TensorInfo], who: str) -> list[QuantWeight]:
    """Parse and validate every quantized weight's state (reads only the small quant-state blobs)."""
    out = []
    for key in sorted(n for n in tensors if QS_MARK in n):
        name, _, qtype = key.partition(QS_MARK)
        info = tensors[key]
        where = info.file
        if qtype not in ("nf4", "fp4"):
            raise _fail(where, name, f"unknown quant type '{qtype}' in '{key}'")
        try:
            state = json.loads(bytes(read_tensor(info).numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(where, name, f"'{key}' is not valid JSON ({e})") from e
        if not isinstance(state, dict):
            raise _fail(where, name, f"'{key}' is not a JSON object")
        for k in ("quant_type", "blocksize", "dtype", "shape"):
            if k not in state:
                raise _fail(where, name, f"'{key}' lacks '{k}'")
        if state["quant_type"] != qtype:
            raise _fail(where, name, f"'{key}' says quant_type '{state['quant_type']}'")
        try:
            shape = tuple(int(d) for d in state["shape"])
            blocksize = int(state["blocksize"])
        except (TypeError, ValueError) as e:
            raise _fail(where, name, f"bad shape/blocksize in '{key}' ({e})") from e
        if blocksize <= 0 or not shape or any(d < 0 for d in shape):
            raise _fail(where, name, f"bad shape {list(shape)} or blocksize {blocksize} in '{key}'")
        parts = {s: tensors.get(f"{name}.{s}") for s in PART_SUFFIXES}
        if name not in tensors:
            raise _fail(where, name, "the packed weight tensor is missing")
        for s in ("absmax", "quant_map"):
            if parts[s] is None:
                raise _fail(where, name, f"'{name}.{s}' is missing")
        nested = parts["nested_absmax"] is not None or parts["nested_quant_map"] is not None
        if nested and (parts["nested_absmax"] is None or parts["nested_quant_map"] is None
                       or "nested_offset" not in state or "nested_blocksize" not in state):
            raise _fail(where, name, "double-quantization state is incomplete (nested_absmax, nested_quant_map, "
                        "nested_offset and nested_blocksize are all needed)")
        q = QuantWeight(name, qtype, blocksize, str(state["dtype"]), shape, tensors[name], parts["absmax"],
                        parts["quant_map"], parts["nested_absmax"], parts["nested_quant_map"],
                        int(state["nested_blocksize"]) if nested else None,
                        float(state["nested_offset"]) if nested else None)
        _check_sizes(q, where)
        out.append(q)
    orphans = [n for n in tensors if n.endswith(tuple("." + s for s in PART_SUFFIXES))
               and n.rsplit(".", 1)[0] not in {q.name for q in out}]
    if orphans:
        raise _fail(tensors[orphans[0]].file, orphans[0].rsplit(".", 1)[0], "quant-state tensors without a "
                    f"'{QS_MARK}nf4|fp4' entry")
    if not out:
        raise InputError(f"{who}: config.json says bitsandbytes 4-bit, but no tensor carries a bnb 4-bit quant state")
    return out


def _check_sizes(q: QuantWeight, where: Path) -> None:
    n = q.numel
    blocks = -(-n // q.blocksize)
    if q.packed.dtype != "U8" or q.packed.numel != (n + 1) // 2:
        raise _fail(where, q.name, f"packed weight is {q.packed.dtype} with {q.packed.numel} elements, expected U8 with "
                    f"{(n + 1) // 2} for shape {list(q.shape)}")
    if q.quant_map.dtype != "F32" or q.quant_map.numel != 16:
        raise _fail(where, q.name, f"quant_map must be 16 float32 values (got {q.quant_map.dtype} {list(q.quant_map.shape)})")
    if q.absmax.numel != blocks:
        raise _fail(where, q.name, f"absmax has {q.absmax.numel} values, expected {blocks} "
                    f"({n} elements / blocksize {q.blocksize})")
    if q.nested_absmax is None:
        if q.absmax.dtype not in ("F32", "F16", "BF16"):
            raise _fail(where, q.name, f"absmax is {q.absmax.dtype}, expected float")
    else:
        nb = q.nested_blocksize or 0
        if q.absmax.dtype != "U8" or nb <= 0:
            raise _fail(where, q.name, f"double-quantized absmax must be U8 with a positive nested_blocksize")
        if q.nested_absmax.numel != -(-blocks // nb) or q.nested_quant_map.numel != 256:
            raise _fail(where, q.name, f"nested_absmax has {q.nested_absmax.numel} values (expected {-(-blocks // nb)}) "
                        f"or nested_quant_map {q.nested_quant_map.numel} (expected 256)")


def dequantize(q: QuantWeight) -> torch.Tensor:
    """The weight as a float32 tensor of its original shape."""
    packed = read_tensor(q.packed).reshape(-1)
    code = read_tensor(q.quant_map).float()
    if q.nested_absmax is not None:
        a8 = read_tensor(q.absmax).long()
        code2 = read_tensor(q.nested_quant_map).float()
        amax2 = read_tensor(q.nested_absmax).float()
        idx = torch.arange(a8.numel()) // q.nested_blocksize
        absmax = code2[a8] * amax2[idx] + torch.tensor(q.nested_offset, dtype=torch.float32)
    else:
        absmax = read_tensor(q.absmax).float()
    n = q.numel
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    vals = code[codes]
    blocks = absmax.numel()
    pad = blocks * q.blocksize - n
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    out = (vals.view(blocks, q.blocksize) * absmax.view(blocks, 1)).reshape(-1)[:n]
    if not torch.isfinite(out).all():
        raise _fail(q.packed.file, q.name, "dequantized values are not finite (absmax holds inf/NaN)")
    return out.reshape(q.shape).contiguous()


class PendingDequant:
    """The temporary float32 file of a 4-bit checkpoint, laid out (so tensor infos can point into it) but written
    only when :meth:`materialize` is first called: planning a merge (``--dry-run``, every validation) reads no
    4-bit weight; the merge materializes its sources right before executing."""

    METADATA = {"format": "pt", "mergeline": "bnb 4-bit dequantized to float32"}

    def __init__(self, weights: list[QuantWeight], path: Path):
        self.weights = weights
        self.path = path
        self.planned = [PlannedTensor(q.name, "F32", q.shape) for q in weights]
        self.done = False

    def infos(self) -> dict[str, TensorInfo]:
        from .safetensors_io import build_header

        header, offsets = build_header(self.planned, self.METADATA)
        return {t.name: TensorInfo(t.name, "F32", t.shape, self.path, len(header) + offsets[t.name], t.nbytes)
                for t in self.planned}

    def materialize(self) -> None:
        """Dequantize every weight (one at a time) into the file; idempotent."""
        if self.done:
            return
        sw = ShardStreamWriter(self.path, self.planned, self.METADATA)
        try:
            for q in self.weights:
                sw.write(q.name, dequantize(q))
            sw.close()
        except BaseException:
            sw.abort()
            self.path.unlink(missing_ok=True)
            raise
        self.done = True


def dequantize_checkpoint(tensors: dict[str, TensorInfo], config: dict[str, Any], tmpdir: Path, who: str
                          ) -> tuple[dict[str, TensorInfo], dict[str, Any], str, PendingDequant]:
    """Plan the float32 view of a 4-bit checkpoint: returns (tensor infos as the engine should see them — 4-bit
    weights as F32 tensors in ``tmpdir``, their quant-state tensors gone —, config without ``quantization_config``,
    a description such as ``"nf4 → float32 (14 weights)"``, the pending writer of the float32 file).

    Every quant state is validated here; nothing is dequantized until ``PendingDequant.materialize()``."""
    qws = find_quant_weights(tensors, who)
    pending = PendingDequant(qws, tmpdir / "dequantized-float32.safetensors")
    drop = {n for q in qws for n in q.part_names()}
    out = {n: i for n, i in tensors.items() if n not in drop}
    out.update(pending.infos())
    conf = {k: v for k, v in config.items() if k != "quantization_config"}
    dtypes = {q.dtype for q in qws}
    if len(dtypes) == 1 and dtypes & {"float16", "bfloat16", "float32"}:
        conf.setdefault("dtype", next(iter(dtypes)))
    kinds = sorted({q.quant_type + ("+double-quant" if q.nested_absmax is not None else "") for q in qws})
    return out, conf, f"{'/'.join(kinds)} → float32 ({len(qws)} weights)", pending


# -- what the manifest says about 4-bit inputs ----------------------------------------------------------------------
_4BIT_NAME = ("bnb-4bit", "bnb_4bit", "-4bit", "_4bit", "nf4", "qlora")


def adapter_trained_on_4bit(adapter_path: Path, adapter_config: dict[str, Any]) -> str | None:
    """Why we believe an adapter was trained on a 4-bit base (None if nothing says so): mergeline's own
    ``training_log.json``, a local base directory that is a bnb checkpoint, or a Hub name marking a 4-bit repo."""
    log = adapter_path / "training_log.json"
    if log.is_file():
        try:
            rec = json.loads(log.read_text())
            flag = (rec.get("metrics") or {}).get("load_in_4bit", (rec.get("config") or {}).get("load_in_4bit"))
            if flag:
                return "training_log.json: load_in_4bit"
        except (OSError, ValueError, AttributeError):
            pass
    base = adapter_config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return None
    cfg = Path(base).expanduser() / "config.json"
    try:
        if cfg.is_file():
            qc = json.loads(cfg.read_text()).get("quantization_config") or {}
            if qc.get("quant_method") == "bitsandbytes" and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
                return f"base_model_name_or_path '{base}' is a bnb 4-bit checkpoint"
    except (OSError, ValueError, AttributeError):
        pass
    if any(m in base.lower() for m in _4BIT_NAME):
        return f"base_model_name_or_path '{base}' names a 4-bit model"
    return None


def quant_manifest(sources) -> dict[str, Any]:
    """Manifest entries for a merge's 4-bit inputs: ``dequantized`` {input: "nf4 → float32 (...)"} and
    ``adapter_bases`` {input: what base a 4-bit-trained adapter was applied to}. Empty when there is nothing to say."""
    deq = {s.label: s.checkpoint.dequantized for s in sources if s.checkpoint.dequantized}
    notes = {}
    for s in sources:
        ad = getattr(s, "adapter", None)
        if ad is None:
            continue
        why = adapter_trained_on_4bit(Path(ad.path), ad.config)
        if why is None:
            continue
        if s.checkpoint.dequantized:
            notes[s.label] = (f"adapter trained on a 4-bit base ({why}); applied to the 4-bit base "
                              f"{s.checkpoint.path} dequantized ({s.checkpoint.dequantized}) — no 16-bit original given")
        else:
            notes[s.label] = (f"adapter trained on a 4-bit base ({why}); applied to the 16-bit base "
                              f"{s.checkpoint.path} (the original weights, preferred over a dequantized 4-bit copy)")
    out: dict[str, Any] = {}
    if deq:
        out["dequantized"] = deq
    if notes:
        out["adapter_bases"] = notes
    return out
