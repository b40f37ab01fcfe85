"""Header-level safetensors reading and header-first streaming writing.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a merge touches then counts in the
process RSS until the file is closed, so peak RSS would grow with model size. Here tensors are read with
``os.pread`` into freshly allocated buffers that are freed as soon as the caller drops them, and a file's header is
parsed once so shapes and dtypes are known before any tensor byte is read (which lets the writer plan the output
layout and emit each shard's header before streaming its tensors).

Format: 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype, shape, data_offsets}}`` plus an
optional ``__metadata__`` str→str map), then the data section; offsets are relative to the data section.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from .lazy_torch import is_tensor, torch

from .errors import InputError

# safetensors dtype code -> torch dtype attribute name (resolved on use: see lazy_torch)
_ST_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
ELEMENT_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


class _LazyDtypeMap(dict):
    """``ST_TO_TORCH`` / ``TORCH_TO_ST``: filled with torch dtypes on first use, so importing this module does not
    import torch."""

    def __init__(self, invert: bool = False):
        super().__init__()
        self._invert = invert
        self._filled = False

    def _fill(self) -> None:
        if not self._filled:
            self._filled = True
            for code, name in _ST_TORCH_NAMES.items():
                dt = getattr(torch, name, None)
                if dt is not None:
                    if self._invert:
                        dict.__setitem__(self, dt, code)
                    else:
                        dict.__setitem__(self, code, dt)

    def __getitem__(self, k):
        self._fill()
        return dict.__getitem__(self, k)

    def __contains__(self, k):
        self._fill()
        return dict.__contains__(self, k)

    def get(self, k, default=None):
        self._fill()
        return dict.get(self, k, default)

    def __iter__(self):
        self._fill()
        return dict.__iter__(self)

    def __len__(self):
        self._fill()
        return dict.__len__(self)

    def keys(self):
        self._fill()
        return dict.keys(self)

    def values(self):
        self._fill()
        return dict.values(self)

    def items(self):
        self._fill()
        return dict.items(self)


ST_TO_TORCH: dict = _LazyDtypeMap()
TORCH_TO_ST: dict = _LazyDtypeMap(invert=True)

FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

MAX_HEADER_BYTES = 100 * 1024 * 1024


def element_size(st_dtype: str) -> int:
    try:
        return ELEMENT_SIZE[st_dtype]
    except KeyError:
        raise InputError(f"unsupported safetensors dtype '{st_dtype}'") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk and what it is. Cheap to hold for every tensor of a model."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_TO_TORCH[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def _no_duplicate_names(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` hook: a header naming a tensor twice is corrupt (plain ``json`` would keep the last one)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateName(k)
        out[k] = v
    return out


class _DuplicateName(Exception):
    pass


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors file's header. Validates it (UTF-8 JSON object, every entry's dtype, shape and offsets
    within the file and consistent with each other, no two tensors sharing bytes) so a corrupt or truncated file
    fails here, naming the file and tensor, not mid-merge. Reads only the header: O(header), no tensor bytes."""
    path = Path(path)
    bad = f"{path}: not a valid safetensors file"
    fix = "re-download or re-save it (safetensors.torch.save_file / save_pretrained)"
    try:
        if path.is_dir():
            raise InputError(f"{path}: is a directory, expected a safetensors file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if not raw_len:
                raise InputError(f"{bad}: the file is empty (0 bytes; an interrupted download?); {fix}")
            if len(raw_len) != 8:
                raise InputError(f"{bad}: shorter than 8 bytes; {fix}")
            (n,) = struct.unpack("<Q", raw_len)
            if n == 0:
                raise InputError(f"{bad}: header length is 0; {fix}")
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise InputError(f"{bad}: header length {n} is impossible for a {size}-byte file (truncated, or not "
                                 f"a safetensors file); {fix}")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_names)
    except UnicodeDecodeError as e:
        raise InputError(f"{bad}: the header is not UTF-8 ({e}); {fix}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{bad}: the header is not valid JSON ({e}); {fix}") from e
    except _DuplicateName as e:
        raise InputError(f"{bad}: the header names tensor '{e.args[0]}' twice; {fix}") from None
    if not isinstance(header, dict):
        raise InputError(f"{bad}: the header is not a JSON object; {fix}")
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{bad}: '__metadata__' must be a JSON object of strings, got {type(metadata).__name__}; {fix}")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: header entry is not an object with dtype, shape and data_offsets; {fix}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise InputError(f"{where}: header entry lacks {', '.join(repr(k) for k in missing)}; {fix}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ELEMENT_SIZE:
            raise InputError(f"{where} has dtype {dtype!r}, which mergeline cannot read (known: "
                             f"{', '.join(ELEMENT_SIZE)}); {fix}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers; {fix}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets):
            raise InputError(f"{where}: data_offsets {offsets!r} is not a pair of integers [begin, end]; {fix}")
        begin, end = offsets
        shape = tuple(shape)
        if begin < 0 or end < 0:
            raise InputError(f"{where} has inconsistent offsets {offsets}: negative; {fix}")
        if end < begin:
            raise InputError(f"{where} has inconsistent offsets {offsets}: reversed (end before begin); {fix}")
        if end > data_size:
            raise InputError(
                f"{where} has inconsistent offsets {offsets}: past the end of the file (its data section holds {data_size} "
                f"bytes; truncated or corrupt download?); {fix}")
        if end - begin != math.prod(shape) * element_size(dtype):
            raise InputError(
                f"{where} has inconsistent offsets {offsets}: {end - begin} bytes, but shape {list(shape)} {dtype} needs "
                f"{math.prod(shape) * element_size(dtype)} (truncated or corrupt download?); {fix}")
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    # no two tensors may share bytes (sorted by start, each must begin at or after the previous end)
    prev: TensorInfo | None = None
    for info in sorted((i for i in infos.values() if i.nbytes), key=lambda i: i.offset):
        if prev is not None and info.offset < prev.offset + prev.nbytes:
            raise InputError(f"{bad}: tensors '{prev.name}' and '{info.name}' overlap in the file; {fix}")
        prev = info
    return infos, {str(k): str(v) for k, v in metadata.items()}


def read_rows(info: TensorInfo, row_start: int = 0, row_end: int | None = None, fd: int | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Read rows ``[row_start, row_end)`` (along dim 0) of a tensor into a new CPU tensor of its own dtype (or into
    ``out``, any contiguous CPU tensor of exactly that many bytes).

    The bytes are read with ``pread`` into a private buffer: no mmap, so nothing stays resident after the caller
    drops the tensor.
    """
    shape = info.shape
    if len(shape) == 0:
        row_start, row_end, row_bytes, out_shape = 0, 1, info.nbytes, ()
    else:
        rows = shape[0]
        row_end = rows if row_end is None else row_end
        row_bytes = info.nbytes // rows if rows else 0
        out_shape = (row_end - row_start,) + tuple(shape[1:])
    count = (row_end - row_start) * row_bytes
    if out is not None:
        if not out.is_contiguous() or out.numel() * out.element_size() != count:
            raise RuntimeError(f"internal: buffer of {out.numel() * out.element_size()} bytes for {count} bytes")
        buf = out.view(-1).view(torch.uint8)
    else:
        buf = torch.empty(count, dtype=torch.uint8)
    if count:
        own = fd is None
        if own:
            fd = os.open(info.file, os.O_RDONLY)
        try:
            view = memoryview(buf.numpy())
            pos = 0
            while pos < count:
                got = os.preadv(fd, [view[pos:]], info.offset + row_start * row_bytes + pos)
                if got <= 0:
                    raise InputError(f"{info.file}: unexpected end of file while reading tensor '{info.name}'")
                pos += got
        finally:
            if own:
                os.close(fd)
    return buf.view(info.torch_dtype).reshape(out_shape)


_NP_FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_rows_f32(info: TensorInfo) -> np.ndarray:
    """A whole (small) floating-point tensor as a float32 numpy array, without torch. Conversions round to nearest
    even like torch's ``.to(torch.float32)`` (bf16 and f16 widen exactly)."""
    if info.dtype not in _NP_FLOATS and info.dtype != "BF16":
        raise InputError(f"{info.file}: tensor '{info.name}' has dtype {info.dtype}; expected a floating-point type")
    buf = np.empty(info.nbytes, dtype=np.uint8)
    if info.nbytes:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            view = memoryview(buf)
            pos = 0
            while pos < info.nbytes:
                got = os.preadv(fd, [view[pos:]], info.offset + pos)
                if got <= 0:
                    raise InputError(f"{info.file}: unexpected end of file while reading tensor '{info.name}'")
                pos += got
        finally:
            os.close(fd)
    if info.dtype == "BF16":
        out = (buf.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        out = buf.view(_NP_FLOATS[info.dtype]).astype(np.float32)
    return out.reshape(info.shape)


def map_rows(info: TensorInfo, row_start: int, row_end: int):
    """Rows ``[row_start, row_end)`` of a tensor as a read-only numpy uint16 array over a private ``mmap`` of just
    that byte range (for the fused CPU kernels: no copy out of the page cache). Returns ``(array, mmap)``; drop the
    array and close the mmap when done, which unmaps the pages (they stop counting in RSS)."""
    import numpy as np

    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // rows if rows else 0
    start = info.offset + row_start * row_bytes
    length = (row_end - row_start) * row_bytes
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    fd = os.open(info.file, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, length + (start - aligned), access=mmap.ACCESS_READ, offset=aligned)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint16, count=length // 2, offset=start - aligned), mm


def advise_willneed(info: TensorInfo) -> None:
    """Ask the kernel to start reading a tensor's bytes into the page cache (asynchronous read-ahead)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(info.file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    return read_rows(info, 0, None, fd)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output shard, known before it is computed."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def build_header(tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (padded to 8-byte alignment) for tensors laid out in the given order; also each tensor's
    offset within the data section."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = pos
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


# safetensors float code -> (unsigned view, exponent mask): a value is NaN or ±inf exactly when all exponent bits are set
_EXP_MASKS = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000),
              "F64": (np.uint64, 0x7FF0000000000000)}


def count_nonfinite(st_dtype: str, data: "bytes | memoryview") -> int:
    """NaN/inf values among raw little-endian bytes of a float tensor (0 for other dtypes): one vectorized pass over
    the exponent bits, no float conversion."""
    spec = _EXP_MASKS.get(st_dtype)
    if spec is None:
        return 0
    view, mask = spec
    arr = np.frombuffer(data, dtype=np.uint8)
    arr = arr[: len(arr) - len(arr) % np.dtype(view).itemsize].view(view)
    return int(np.count_nonzero((arr & view(mask)) == view(mask)))


class ShardStreamWriter:
    """Writes one safetensors file whose layout is fixed up front: header first, then each tensor's bytes in the
    planned order, possibly in several pieces (row chunks). Checks that every byte promised by the header arrives."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None,
                 fsync: bool = False, check_finite: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        #: with ``check_finite``: tensor name -> number of NaN/inf values written (only tensors that have some)
        self.nonfinite: dict[str, int] | None = {} if check_finite else None
        self.tensors = tensors
        self._order = {t.name: i for i, t in enumerate(tensors)}
        header, _ = build_header(tensors, metadata)
        self._f: BinaryIO = open(self.path, "wb")
        self.sha256 = hashlib.sha256()
        self._f.write(header)
        self.sha256.update(header)
        self._next = 0  # index of the tensor expected next
        self._written = 0  # bytes written of the current tensor
        while self._next < len(self.tensors) and self.tensors[self._next].nbytes == 0:
            self._next += 1

    def write(self, name: str, data: "torch.Tensor | np.ndarray | bytes | memoryview") -> None:
        """Append bytes of tensor ``name``; tensors must come in planned order, a tensor may come in pieces. A numpy
        array is taken as raw bytes (fused kernels hand over bf16 as uint16 bits)."""
        if isinstance(data, np.ndarray):
            data = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        tensor = is_tensor(data)
        empty = data.numel() == 0 if tensor else len(data) == 0
        if empty:  # zero-size tensors need no bytes; the writer skips them by itself
            return
        if self._next >= len(self.tensors) or self.tensors[self._next].name != name:
            expected = self.tensors[self._next].name if self._next < len(self.tensors) else "<none>"
            raise RuntimeError(f"internal: writer for {self.path.name} expected tensor '{expected}', got '{name}'")
        planned = self.tensors[self._next]
        if tensor:
            if data.dtype != ST_TO_TORCH[planned.dtype]:
                raise RuntimeError(f"internal: tensor '{name}' planned as {planned.dtype}, got {data.dtype}")
            data = data.contiguous().view(-1).view(torch.uint8).numpy().data
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self.nonfinite is not None:
            bad = count_nonfinite(planned.dtype, data)
            if bad:
                self.nonfinite[name] = self.nonfinite.get(name, 0) + bad
        self._f.write(data)
        self.sha256.update(data)
        self._written += n
        if self._written > planned.nbytes:
            raise RuntimeError(f"internal: tensor '{name}' got {self._written} bytes, planned {planned.nbytes}")
        if self._written == planned.nbytes:
            self._next += 1
            self._written = 0
            # zero-byte tensors that follow are complete as soon as they are reached
            while self._next < len(self.tensors) and self.tensors[self._next].nbytes == 0:
                self._next += 1

    def copy_from_file(self, name: str, info: TensorInfo, piece: int = 16 * 1024 * 1024) -> None:
        """Append a tensor's bytes straight from an input file, without decoding (and hash them on the way)."""
        remaining, pos = info.nbytes, info.offset
        with open(info.file, "rb", buffering=0) as src:
            while remaining:
                data = os.pread(src.fileno(), min(piece, remaining), pos)
                if not data:
                    raise InputError(f"{info.file}: unexpected end of file while copying tensor '{name}'")
                self.write(name, data)
                pos += len(data)
                remaining -= len(data)

    def close(self) -> None:
        if self._next != len(self.tensors):
            missing = self.tensors[self._next].name
            self._f.close()
            raise RuntimeError(f"internal: {self.path.name} closed before tensor '{missing}' was written")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
