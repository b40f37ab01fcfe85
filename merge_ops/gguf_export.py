"""Framework-free, streaming GGUF export of a Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3).

How it streams: the whole layout (every tensor's GGUF name, type, shape and byte size) is planned from the
safetensors headers before any tensor byte is read; ``gguf.GGUFWriter`` then writes the header, the key/values
(architecture, tokenizer, chat template) and the tensor-info table, and this module appends each tensor's data a
chunk of rows at a time (read with ``pread`` from the source, RoPE-permuted where needed, encoded, written, freed).
Peak memory is a few chunks, independent of model and tensor size. The sha256 of the file is computed from the same
bytes as they are written. Everything goes to a hidden temporary file in the output directory that is renamed over
the target only when complete, so an interrupted export leaves nothing behind.

Types written in-process: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (``gguf``'s reference quantizers) and the
k-quant mixes q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (:mod:`merge_ops.gguf_kquants`). q2_k and q3_k_s/m/l need the
optional ``llama-cpp-python`` package: an F32/F16/BF16 GGUF is written first (lossless for the source dtype) and
llama.cpp's own ``llama_model_quantize`` turns it into the mix.
"""

from __future__ import annotations

import hashlib
import os
import resource
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from pydantic import BaseModel, Field

from .checkpoint import Checkpoint
from .errors import MergeError
from .output_dir import _terminate_as_interrupt
from .gguf_arch import (
    SKIP_SUFFIXES, Family, HParams, check_rope_scaling, detect_family, gguf_tensor_name, llama3_rope_factors,
    qk_heads, read_hparams, supported_families, write_hparams,
)
from .gguf_quant import (
    ALL_QUANTS, IN_PROCESS, LLAMA_CPP_QUANTS, choose_type, encode_rows, file_type, tensor_nbytes,
)
from .gguf_tokenizer import TokenizerExportError, read_tokenizer
from .safetensors_io import TensorInfo, read_rows

T = gguf.GGMLQuantizationType
ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT
CHUNK_BYTES = 16 * 1024 * 1024  # float32 bytes per encoded chunk of rows

ProgressFn = Callable[[int, int], None]


class GgufExportError(MergeError):
    """The model cannot be exported to GGUF as asked (unsupported architecture or quant, missing files, a
    tokenizer GGUF cannot represent, llama-cpp-python missing for a k-quant). Raised before heavy work."""


class GgufExportResult(BaseModel):
    """What one export produced; ``sha256`` is the data version of the file."""

    path: str
    quant: str
    architecture: str = Field(description="GGUF general.architecture, e.g. 'llama' (also for Mistral)")
    family: str = Field(description="source model family: llama, mistral, qwen2 or qwen3")
    tensor_count: int
    bytes: int = Field(description="size of the GGUF file")
    source_bytes: int = Field(description="bytes of safetensors tensor data read")
    compression_ratio: float = Field(description="source_bytes / bytes")
    sha256: str
    seconds: float
    peak_rss_bytes: int = Field(description="peak resident memory of this process so far (getrusage ru_maxrss)")
    tensor_types: dict[str, int] = Field(default_factory=dict, description="GGML type name -> tensor count")
    notes: list[str] = Field(default_factory=list)

    def summary(self) -> str:
        return (f"ok: {self.path} ({self.quant}, {self.family} -> {self.architecture}, {self.tensor_count} tensors, "
                f"{self.bytes / 1e6:.1f} MB, {self.compression_ratio:.2f}x smaller than {self.source_bytes / 1e6:.1f} "
                f"MB source, {self.seconds:.1f} s, sha256 {self.sha256[:12]})")


@dataclass
class _Planned:
    gguf_name: str
    ggml_type: T
    shape: tuple[int, ...]  # Hugging Face order (rows, cols)
    nbytes: int
    info: TensorInfo | None = None  # source tensor; None for generated tensors
    data: np.ndarray | None = None  # generated tensor (rope_freqs)
    heads: int | None = None  # RoPE permutation over this many heads
    head_dim: int = 0


def _order_key(p: _Planned) -> tuple[int, str]:
    n = p.gguf_name
    if n.startswith("blk."):
        return (int(n.split(".")[1]) + 1, n)
    if n.startswith(("token_embd", "rope_freqs")):
        return (0, n)
    return (1 << 30, n)


def _plan(ckpt: Checkpoint, family: Family, hp: HParams, quant: str, notes: list[str]) -> list[_Planned]:
    name_map = gguf.get_tensor_name_map(family.arch, hp.n_layers)
    plan: list[_Planned] = []
    unknown: list[str] = []
    seen: dict[str, str] = {}
    has_lm_head = "lm_head.weight" in ckpt.tensors
    has_output = has_lm_head and not hp.tie_embeddings
    for hf_name, info in ckpt.tensors.items():
        if hf_name.endswith(SKIP_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and hp.tie_embeddings:
            notes.append("lm_head.weight: tied to the embedding; not written (llama.cpp reuses token_embd)")
            continue
        gname = gguf_tensor_name(family, hp.n_layers, hf_name, name_map)
        if gname is None:
            unknown.append(hf_name)
            continue
        if gname in seen:
            raise GgufExportError(f"{ckpt.path}: tensors '{seen[gname]}' and '{hf_name}' both map to GGUF '{gname}'")
        seen[gname] = hf_name
        if not info.is_float:
            raise GgufExportError(f"{ckpt.path}: tensor '{hf_name}' has dtype {info.dtype}; GGUF export needs float "
                                  f"weights (dequantize the model first)")
        shape = tuple(info.shape)
        heads = qk_heads(gname, hp) if family.permute_qk else None
        if heads is not None:
            if shape[0] != heads * hp.head_dim or hp.head_dim % 2:
                raise GgufExportError(f"{ckpt.path}: tensor '{hf_name}' has {shape[0]} rows, expected {heads} heads × "
                                      f"{hp.head_dim} (even head size) from config.json")
        choice = choose_type(quant, gname, shape, hp.n_layers, has_output)
        if choice.note:
            notes.append(choice.note)
        plan.append(_Planned(gname, choice.ggml_type, shape, tensor_nbytes(choice.ggml_type, shape), info,
                             heads=heads, head_dim=hp.head_dim))
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise GgufExportError(f"{ckpt.path}: {len(unknown)} tensor(s) have no GGUF name for the {family.name} "
                              f"family: {shown}")
    if "token_embd.weight" not in seen:
        raise GgufExportError(f"{ckpt.path}: no embedding tensor (model.embed_tokens.weight) found")
    if not has_lm_head and not hp.tie_embeddings:
        notes.append("no lm_head.weight in the checkpoint: the GGUF ties the output to the embedding")
    if hp.rope_scaling is not None and hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type")) == "llama3":
        factors = llama3_rope_factors(hp)
        plan.append(_Planned("rope_freqs.weight", T.F32, factors.shape, factors.nbytes, data=factors))
    plan.sort(key=_order_key)
    return plan


def _permute_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """llama.cpp's Q/K permutation for a chunk of whole heads: within each head, rows (2, head_dim/2) are
    transposed to (head_dim/2, 2), i.e. HF's rotate-half pairing becomes GGML's interleaved pairing."""
    n = rows.shape[0] // head_dim
    return rows.reshape(n, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


class _HashingSink:
    """The open GGUF file plus the running sha256 of every byte written."""

    def __init__(self, f, path: Path, header_len: int):
        self.f = f
        self.sha = hashlib.sha256()
        with open(path, "rb") as r:  # header, key/values and tensor infos as GGUFWriter wrote them
            self.sha.update(r.read(header_len))
        self.pos = header_len

    def write(self, data) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.pos += memoryview(data).nbytes

    def pad(self) -> None:
        n = (-self.pos) % ALIGN
        if n:
            self.write(b"\0" * n)


def _write_tensor(sink: _HashingSink, p: _Planned, fd: int) -> None:
    if p.data is not None:
        sink.write(encode_rows(torch.from_numpy(p.data), p.ggml_type))
        return
    info = p.info
    assert info is not None
    if len(p.shape) < 2:
        t = read_rows(info, fd=fd).to(torch.float32)
        if p.heads is not None:  # a Q/K bias
            t = _permute_rows(t, p.head_dim)
        sink.write(encode_rows(t, p.ggml_type))
        return
    rows, cols = p.shape[0], int(np.prod(p.shape[1:]))
    align = p.head_dim if p.heads is not None else 1
    step = max(align, (CHUNK_BYTES // max(1, cols * 4)) // align * align)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = read_rows(info, r0, r1, fd=fd).to(torch.float32).reshape(r1 - r0, cols)
        if p.heads is not None:
            chunk = _permute_rows(chunk, p.head_dim)
        sink.write(encode_rows(chunk, p.ggml_type))
        del chunk


def _write_gguf(tmp: Path, ckpt: Checkpoint, family: Family, hp: HParams, tokenizer, quant: str,
                plan: list[_Planned], notes: list[str], progress: ProgressFn | None) -> str:
    """Write the complete GGUF to ``tmp``; returns its sha256."""
    arch_name = gguf.MODEL_ARCH_NAMES[family.arch]
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_name(ckpt.path.name)
    writer.add_file_type(int(file_type(quant)))
    if any(p.ggml_type not in (T.F32, T.F16, T.BF16) for p in plan):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    notes.extend(write_hparams(writer, hp, family))
    tokenizer.write(writer)
    for p in plan:
        np_dtype = {T.F32: np.float32, T.F16: np.float16}.get(p.ggml_type)
        if np_dtype is not None:
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np_dtype), p.nbytes)
        else:  # logical shape with raw_dtype: GGUFWriter converts only uint8 byte shapes
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.ggml_type)
    writer.write_header_to_file(path=Path(tmp))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    f = writer.fout[0]
    f.flush()
    try:
        sink = _HashingSink(f, tmp, f.tell())
        sink.pad()
        fds: dict[Path, int] = {}
        try:
            for i, p in enumerate(plan):
                fd = -1
                if p.info is not None:
                    fd = fds.get(p.info.file, -1)
                    if fd < 0:
                        fd = fds[p.info.file] = os.open(p.info.file, os.O_RDONLY)
                start = sink.pos
                _write_tensor(sink, p, fd)
                if sink.pos - start != p.nbytes:
                    raise RuntimeError(f"internal: {p.gguf_name} wrote {sink.pos - start} bytes, planned {p.nbytes}")
                sink.pad()
                if progress is not None:
                    progress(i + 1, len(plan))
        finally:
            for fd in fds.values():
                os.close(fd)
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()
        writer.fout = None
    return sink.sha.hexdigest()


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(8 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    """Run llama.cpp's quantizer (k-quant mixes) through llama-cpp-python's C API."""
    import ctypes

    import llama_cpp  # checked importable before any work

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_CPP_QUANTS[quant])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise GgufExportError(f"llama.cpp's quantizer failed for {quant} (status {rc}) on {src}")


def _check_llama_cpp(quant: str) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise GgufExportError(
            f"quant '{quant}' is a llama.cpp k-quant and needs the optional llama-cpp-python package "
            f"(pip install 'mergeline[gguf-llamacpp]' or pip install llama-cpp-python); in-process types without it: "
            f"{', '.join(IN_PROCESS)}") from e


def export_gguf(model_dir: str | Path, out_file: str | Path, quant: str = "q8_0", *,
                progress: ProgressFn | None = None) -> GgufExportResult:
    """Export a Hugging Face safetensors model directory to one GGUF file.

    ``quant``: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (in-process), or
    q2_k, q3_k_s, q3_k_m, q3_k_l (need llama-cpp-python). ``progress(done, total)`` is called after each tensor.
    Raises :class:`GgufExportError` for unsupported input, before reading any tensor data.
    """
    t0 = time.perf_counter()
    q = str(quant).strip().lower()
    if q not in ALL_QUANTS:
        raise GgufExportError(f"unknown GGUF quant '{quant}'; one of {', '.join(ALL_QUANTS)}")
    if q in LLAMA_CPP_QUANTS:
        _check_llama_cpp(q)
    model_dir = Path(model_dir)
    out_file = Path(out_file).absolute()
    if out_file.is_dir():
        raise GgufExportError(f"output '{out_file}' is a directory; give a file name like model-{q}.gguf")
    anc = out_file.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise GgufExportError(f"output '{out_file}': '{anc}' is not a directory, so the file cannot be created under it")
    try:
        ckpt = Checkpoint.open(model_dir)
    except MergeError as e:
        raise GgufExportError(str(e)) from e
    if out_file.resolve() in {f.resolve() for f in ckpt.input_files()}:
        raise GgufExportError(f"output '{out_file}' is one of the model's own files; writing there would destroy the "
                              f"input. Choose another output file")
    if not ckpt.config:
        raise GgufExportError(f"{model_dir}: no config.json; GGUF export needs the model's config")
    family = detect_family(ckpt.config)
    if family is None:
        got = ckpt.architecture or "unknown"
        raise GgufExportError(f"{model_dir}: architecture '{got}' is not supported for GGUF export; supported "
                              f"families: {supported_families()}")
    try:
        hp = read_hparams(ckpt.config, family, str(model_dir))
        check_rope_scaling(hp, str(model_dir))
    except ValueError as e:
        raise GgufExportError(str(e)) from e
    notes: list[str] = []
    base_quant = q
    if q in LLAMA_CPP_QUANTS:
        dtypes = {i.dtype for i in ckpt.tensors.values() if i.is_float}
        base_quant = "bf16" if dtypes == {"BF16"} else "f16" if dtypes == {"F16"} else "f32"
    plan = _plan(ckpt, family, hp, base_quant, notes)
    embd = next(p for p in plan if p.gguf_name == "token_embd.weight")
    try:
        tokenizer = read_tokenizer(model_dir, embd.shape[0], ckpt.config)
    except TokenizerExportError as e:
        raise GgufExportError(str(e)) from e
    notes.extend(tokenizer.notes)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.parent / f".{out_file.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    inter = out_file.parent / f".{out_file.name}.{base_quant}-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with _terminate_as_interrupt():
            if q in LLAMA_CPP_QUANTS:
                _write_gguf(inter, ckpt, family, hp, tokenizer, base_quant, plan, notes, progress)
                _llama_cpp_quantize(inter, tmp, q)
                sha = _sha256_of(tmp)  # llama.cpp writes the file; hashed once after
                notes.append(f"k-quant {q} made by llama.cpp's quantizer from a {base_quant} intermediate")
            else:
                sha = _write_gguf(tmp, ckpt, family, hp, tokenizer, q, plan, notes, progress)
            os.replace(tmp, out_file)
    finally:
        for leftover in (tmp, inter):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
    size = out_file.stat().st_size
    source_bytes = sum(p.info.nbytes for p in plan if p.info is not None)
    types: dict[str, int] = {}
    for p in plan:
        types[p.ggml_type.name] = types.get(p.ggml_type.name, 0) + 1
    if q in LLAMA_CPP_QUANTS:
        types = {}
        try:
            reader = gguf.GGUFReader(str(out_file))
            for t in reader.tensors:
                types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        except Exception:  # informational only
            pass
    return GgufExportResult(
        path=str(out_file), quant=q, architecture=gguf.MODEL_ARCH_NAMES[family.arch], family=family.name,
        tensor_count=len(plan), bytes=size, source_bytes=source_bytes,
        compression_ratio=round(source_bytes / size, 4) if size else 0.0, sha256=sha,
        seconds=round(time.perf_counter() - t0, 3),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        tensor_types=types, notes=notes,
    )
