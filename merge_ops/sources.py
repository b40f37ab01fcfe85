"""An input model of a merge: a checkpoint, optionally with a LoRA adapter applied on the fly (``base+adapter``).

Applying the adapter per tensor while streaming means ``base+adapter`` references need no cache directory and never
materialize the merged model on disk.
"""

from __future__ import annotations

from pathlib import Path

from .lazy_torch import torch

from .checkpoint import Checkpoint
from .errors import InputError
from .references import ModelRef, parse_ref, resolve_path
from .safetensors_io import TensorInfo, read_rows


class ModelSource:
    def __init__(self, ref: ModelRef, checkpoint: Checkpoint, adapter=None):
        self.ref = ref
        self.label = ref.raw
        self.checkpoint = checkpoint
        self.adapter = adapter
        self.round_to_stored = True  # adapted tensors rounded to the base's dtype (see to_compute)
        self._changed = adapter.changed_tensors() if adapter is not None else set()

    @classmethod
    def open(cls, raw: str, *, allow_pickle: bool = False, download: bool = False) -> "ModelSource":
        ref = parse_ref(raw)
        path = resolve_path(ref.model, ref.revision, label=f"model '{raw}'", download=download)
        ckpt = Checkpoint.open(path, allow_pickle=allow_pickle, label=raw)
        adapter = None
        if ref.adapter:
            from .lora import LoraAdapter

            apath = resolve_path(ref.adapter, ref.adapter_revision, label=f"model '{raw}'", download=download,
                                 kind="adapter")
            adapter = LoraAdapter.open(apath, allow_pickle=allow_pickle)
            adapter.check_base(ckpt)
        return cls(ref, ckpt, adapter)

    @classmethod
    def from_parts(cls, base: str | Path, adapter: str | Path | None, *, allow_pickle: bool = False) -> "ModelSource":
        """Open a base directory plus an optional adapter directory (paths, no reference parsing)."""
        base = Path(base)
        ref = ModelRef(f"{base}+{adapter}" if adapter else str(base), str(base), None, str(adapter) if adapter else None)
        ckpt = Checkpoint.open(base, allow_pickle=allow_pickle, label=str(base))
        ad = None
        if adapter is not None:
            from .lora import LoraAdapter

            if not Path(adapter).exists():
                raise InputError(f"adapter directory '{adapter}' does not exist")
            ad = LoraAdapter.open(Path(adapter), allow_pickle=allow_pickle)
            ad.check_base(ckpt)
        return cls(ref, ckpt, ad)

    # -- tensor access -----------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.checkpoint.tensors

    def info(self, name: str) -> TensorInfo:
        """Where the tensor's bytes come from (a modules_to_save replacement wins over the base)."""
        if self.adapter is not None:
            rep = self.adapter.replacement(name)
            if rep is not None:
                return rep
        return self.checkpoint.tensors[name]

    def unchanged(self, name: str) -> bool:
        """True if the tensor's bytes on disk are its final value (no adapter arithmetic needed)."""
        if self.adapter is None or name not in self._changed:
            return True
        # a modules_to_save / base_layer copy is final only when no LoRA delta applies on top of it
        return self.adapter.replacement(name) is not None and self.adapter.scale(name) is None

    def row_local(self, name: str) -> bool:
        return self.unchanged(name) or self.adapter.is_row_local(name)

    def read_raw(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        return read_rows(self.info(name), row_start, row_end)

    def read_raw_into(self, name: str, out: torch.Tensor, row_start: int = 0, row_end: int | None = None) -> None:
        read_rows(self.info(name), row_start, row_end, out=out)

    def to_compute(self, name: str, raw: torch.Tensor, row_start: int, dtype: torch.dtype,
                   device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw rows → a new tensor (or ``out``, a reusable buffer of the right shape) in the compute dtype on the
        device, with the adapter's delta applied. Never returns ``raw`` itself, so callers may modify the result."""
        target = out.device if out is not None else device
        if target.type != "cpu" and raw.device.type == "cpu" and raw.dtype != dtype:
            # Cross the bus in the stored dtype and upcast on the GPU: torch's copy_ with a dtype change converts on
            # the host first, which doubles the bytes sent (bf16 → f32) and keeps every host core busy converting
            # (measured on an H200 host: 66 CPU-seconds for one 0.5 B linear merge, 4× slower than the CPU path).
            raw = raw.to(device=target)
        if out is not None:
            x = out.copy_(raw)  # upcasting into a reused buffer is several times faster than a fresh .to()
        else:
            x = raw.to(device=device, dtype=dtype, copy=True)
        if not self.unchanged(name):
            x = self.adapter.apply(name, x, row_start)
            # As a merge input, ``base+adapter`` is a model: its adapted weights are stored in the base's dtype, as
            # PEFT's merge_and_unload + save (and MergeKit, and `mergeline merge-lora`) store them. Rounding here makes
            # a merge over ``base+adapter`` byte-identical to one over the merged directory (and to MergeKit's).
            # merge-lora itself turns this off: its output dtype is the user's choice (--dtype float32 keeps all bits).
            if not self.round_to_stored:
                return x
            stored = self.checkpoint.tensors[name].torch_dtype if name in self.checkpoint.tensors else raw.dtype
            if stored.is_floating_point and torch.finfo(stored).bits < torch.finfo(x.dtype).bits:
                x = x.to(stored).to(x.dtype)
        return x

    def input_files(self) -> list[Path]:
        files = self.checkpoint.input_files()
        if self.adapter is not None:
            files += self.adapter.input_files()
        return files

    @property
    def paths(self) -> dict[str, str]:
        d = {"model": str(self.checkpoint.path)}
        if self.adapter is not None:
            d["adapter"] = str(self.adapter.path)
        return d
