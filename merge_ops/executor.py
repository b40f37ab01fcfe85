"""Runs a :class:`~merge_ops.plan.MergePlan`: reads inputs row block by row block, calls the method, streams results
into shards whose headers were written first.

Memory stays flat in model size: a tensor's raw inputs are kept whole only when they fit ``cache_bytes`` (a
constant), otherwise every pass re-reads row blocks of at most ``chunk_elements`` elements. Three threads overlap:
a prefetcher reads the next tensor's inputs, the main thread computes, a writer thread writes and hashes output bytes.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .lazy_torch import CpuDevice, is_tensor, torch

from .methods.base import Chunk
from .plan import InputRef, MergePlan, OutputTensor
from .safetensors_io import ST_TO_TORCH, PlannedTensor, ShardStreamWriter, advise_willneed, map_rows

DEFAULT_CHUNK_ELEMENTS = 2 * 1024 * 1024
DEFAULT_CACHE_BYTES = 16 * 1024 * 1024  # raw inputs of one tensor kept whole below this; streamed above
WRITE_QUEUE_BYTES = 16 * 1024 * 1024  # output bytes waiting for the writer thread (4 blocks; more bought no speed)
# On a GPU, a method with statistics passes (TIES, DARE-TIES, DELLA, breadcrumbs, SLERP's norms, ...) pays for every
# extra pass over a streamed tensor with another read from the host, while the GPU arithmetic is nearly free: such
# tensors are taken in row blocks of up to 64 Mi elements (most whole, so one read) and the prefetch thread reads up to
# 512 MiB of their raw inputs while the GPU works. Single-pass methods keep the CPU's sizes: measured on an H200 host
# (bench/block_sizes.py, 0.5 B bf16 models), the big blocks halved TIES (6.7 → 3.3 s) but did not help linear or
# LoRA and cost ~500 MB more host RSS.
# Host memory stays a constant (≈ 2 × the cache); GPU blocks are capped by free GPU memory.
CUDA_STATS_CHUNK_ELEMENTS = 64 * 1024 * 1024
CUDA_STATS_CACHE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class BlockSizes:
    """Row-block size and whole-tensor cache, for tensors of single-pass methods and of methods with statistics."""
    chunk_elements: int
    cache_bytes: int
    stats_chunk_elements: int
    stats_cache_bytes: int


def block_sizes(device, chunk_elements: int | None, cache_bytes: int | None) -> BlockSizes:
    """The sizes for ``device``; an explicit size (not ``None``) is used for every tensor. The environment variables
    ``MERGELINE_CHUNK_ELEMENTS`` / ``MERGELINE_CACHE_BYTES`` replace the defaults (tuning, benchmarks)."""
    chunk = chunk_elements or int(os.environ.get("MERGELINE_CHUNK_ELEMENTS", 0)) or DEFAULT_CHUNK_ELEMENTS
    cache = cache_bytes if cache_bytes is not None else (
        int(os.environ.get("MERGELINE_CACHE_BYTES", 0)) or DEFAULT_CACHE_BYTES)
    stats_chunk, stats_cache = chunk, cache
    if getattr(device, "type", "cpu") == "cuda":
        if chunk_elements is None and "MERGELINE_CHUNK_ELEMENTS" not in os.environ:
            free, _ = torch.cuda.mem_get_info(device)  # a small or busy card: ~64 float32 block buffers must fit
            stats_chunk = max(chunk, min(CUDA_STATS_CHUNK_ELEMENTS, free // 256))
        if cache_bytes is None and "MERGELINE_CACHE_BYTES" not in os.environ:
            stats_cache = CUDA_STATS_CACHE_BYTES
    return BlockSizes(chunk, cache, stats_chunk, stats_cache)


@dataclass
class ShardInfo:
    filename: str
    tensors: list[OutputTensor]
    nbytes: int
    sha256: str = ""


def group_by_size(items: list, shard_size: int) -> list[list]:
    """Greedy, in order: a new group starts when the next item (anything with ``nbytes``) would overflow
    ``shard_size``. Shared by every writer of sharded safetensors (merges, bnb exports)."""
    groups: list[list] = [[]]
    size = 0
    for t in items:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def layout_shards(tensors: list[OutputTensor], shard_size: int) -> list[ShardInfo]:
    """Greedy, in plan order: a new shard starts when the next tensor would overflow ``shard_size``."""
    groups = group_by_size(tensors, shard_size)
    n = len(groups)
    return [ShardInfo(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, sum(t.nbytes for t in g))
            for i, g in enumerate(groups)]


def chunk_ranges(shape: tuple[int, ...], chunk_elements: int) -> list[tuple[int, int]]:
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    rows = shape[0]
    row_elems = max(1, math.prod(shape[1:]))
    per = max(1, chunk_elements // row_elems)
    return [(r, min(rows, r + per)) for r in range(0, rows, per)] or [(0, 0)]


class RawInputs(list):
    """Raw input tensors of one output tensor; ``stacked`` is their common (inputs × elements) int16 buffer when
    they were read for a fused kernel."""

    def __init__(self, items, stacked: torch.Tensor | None = None):
        super().__init__(items)
        self.stacked = stacked


class _Writer:
    """One background thread that writes and hashes; ``submit`` blocks while more than ``max_bytes`` of output
    wait to be written (bounded memory)."""

    def __init__(self, max_bytes: int | None = None):
        max_bytes = max_bytes or int(os.environ.get("MERGELINE_WRITE_QUEUE_BYTES", 0)) or WRITE_QUEUE_BYTES
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeline-writer")
        self._cond = threading.Condition()
        self._pending = 0
        self._max = max_bytes
        self._futures: list[Future] = []

    def submit(self, fn: Callable[[], None], nbytes: int = 0) -> None:
        with self._cond:
            while self._pending > 0 and self._pending + nbytes > self._max:
                self._cond.wait()
            self._pending += nbytes

        def run():
            try:
                fn()
            finally:
                with self._cond:
                    self._pending -= nbytes
                    self._cond.notify_all()

        self._futures.append(self._pool.submit(run))
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def drain(self) -> None:
        for f in self._futures:
            f.result()
        self._futures = []

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Executor:
    def __init__(self, plan: MergePlan, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, progress: Callable[[int], None] | None = None,
                 fsync: bool = False, check_finite: bool = False, stats_chunk_elements: int | None = None,
                 stats_cache_bytes: int | None = None):
        self.fsync = fsync
        self.check_finite = check_finite
        self.nonfinite: dict[str, int] = {}  # with check_finite: output tensor -> NaN/inf count
        self.plan = plan
        self.device = plan.tensors[0].task.device if plan.tensors and plan.tensors[0].task else CpuDevice()
        for t in plan.tensors:
            if t.task is not None:
                self.device = t.task.device
                break
        self.chunk_elements = chunk_elements
        self.cache_bytes = cache_bytes
        # tensors that need statistics passes (see block_sizes): bigger blocks where each pass costs a read
        self.stats_chunk_elements = stats_chunk_elements or chunk_elements
        self.stats_cache_bytes = stats_cache_bytes if stats_cache_bytes is not None else cache_bytes
        self.progress = progress or (lambda n: None)
        self._bufs: dict[int, torch.Tensor] = {}

    # -- raw input access --------------------------------------------------------------------------------------------
    def _inputs(self, ot: OutputTensor) -> list[InputRef]:
        refs = list(ot.inputs)
        if ot.base is not None:
            refs = [ot.base] + refs
        if ot.copy_from is not None:
            refs = [ot.copy_from]
        return refs

    def _prefetch(self, ot: OutputTensor) -> list[torch.Tensor] | None:
        """Whole raw inputs of a tensor when they fit the cache budget (read in the prefetch thread)."""
        refs = self._inputs(ot)
        srcs = self.plan.sources
        if ot.copy_from is not None and srcs[ot.copy_from.source].unchanged(ot.copy_from.tensor) and \
                srcs[ot.copy_from.source].info(ot.copy_from.tensor).dtype == ot.dtype:
            return None  # raw byte copy, done by the writer
        if (ot.task is not None and self._fused(ot) is not None) or self._lora_fast(ot) is not None:
            # fused kernels read memory-mapped inputs: only ask the kernel to start reading them now
            for r in refs:
                advise_willneed(srcs[r.source].info(r.tensor))
            return None
        total = sum(srcs[r.source].info(r.tensor).nbytes for r in refs)
        if total > (self.stats_cache_bytes if self._needs_stats(ot) else self.cache_bytes):
            return None
        return RawInputs([srcs[r.source].read_raw(r.tensor) for r in refs])

    def _load(self, ot: OutputTensor, cached: list[torch.Tensor] | None, index: int, r0: int, r1: int,
              last: bool) -> Chunk:
        srcs = self.plan.sources
        dtype = ot.task.compute_dtype if ot.task else torch.float32
        xs = []
        for k, r in enumerate(self._inputs(ot)):
            src = srcs[r.source]
            raw = cached[k][r0:r1] if cached is not None and len(ot.shape) >= 1 else (
                cached[k] if cached is not None else src.read_raw(r.tensor, r0, r1 if ot.shape else None))
            xs.append(src.to_compute(r.tensor, raw, r0, dtype, self.device, out=self._buffer(k, raw.shape, dtype)))
        if ot.base is not None:
            return Chunk(index, r0, r1, xs[0], xs[1:], last)
        return Chunk(index, r0, r1, None, xs, last)

    def _buffer(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable compute buffer for input ``slot`` (grown on demand, never shrunk: its size is bounded by
        ``chunk_elements`` or ``cache_bytes``, not by the model)."""
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get(slot)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self._bufs[slot] = buf
        return buf[:n].view(shape)

    @staticmethod
    def _detach_from(result: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """Results that alias a reusable input buffer must be copied before the writer thread gets them."""
        ptrs = {t.data_ptr() for t in chunk.models}
        if chunk.base is not None:
            ptrs.add(chunk.base.data_ptr())
        return result.clone() if result.data_ptr() in ptrs else result

    # -- per tensor --------------------------------------------------------------------------------------------------
    def _ranges(self, ot: OutputTensor) -> list[tuple[int, int]]:
        srcs = self.plan.sources
        if not all(srcs[r.source].row_local(r.tensor) for r in self._inputs(ot)):
            return [(0, ot.shape[0] if ot.shape else 1)]
        return chunk_ranges(ot.shape, self.stats_chunk_elements if self._needs_stats(ot) else self.chunk_elements)

    def _needs_stats(self, ot: OutputTensor) -> bool:
        """Whether this tensor's method makes statistics passes over it (TIES/breadcrumbs top-k, DARE rescaling, SLERP
        norms, ...): asked only where the stats sizes differ (a GPU); cheap (selectors are allocated lazily)."""
        if ot.task is None or (self.stats_chunk_elements == self.chunk_elements
                               and self.stats_cache_bytes == self.cache_bytes):
            return False
        method = self.plan.method
        return method.stats_passes(ot.task, method.init_stats(ot.task)) > 0

    def _tensor(self, ot: OutputTensor, cached, emit: Callable[[torch.Tensor], None]) -> None:
        if ot.task is not None:
            fused = self._fused(ot)
            if fused is not None:
                self._tensor_fused(ot, cached, fused, emit)
                return
        fast = self._lora_fast(ot)
        if fast is not None:
            self._tensor_lora(ot, fast, emit)
            return
        out_dtype = ST_TO_TORCH[ot.dtype]
        ranges = self._ranges(ot)
        if ot.task is None:  # copy with a dtype change or an adapter applied
            for i, (r0, r1) in enumerate(ranges):
                c = self._load(ot, cached, i, r0, r1, i == len(ranges) - 1)
                emit(self._detach_from(c.models[0].to(out_dtype), c))
            return
        method, task = self.plan.method, ot.task
        stats = method.init_stats(task)
        passes = method.stats_passes(task, stats)
        if len(ranges) == 1:
            r0, r1 = ranges[0]
            c = self._load(ot, cached, 0, r0, r1, True)
            for p in range(passes):
                method.accumulate(task, c, stats, p)
                method.finish_pass(task, stats, p)
            emit(self._detach_from(method.apply(task, c, stats).to(out_dtype), c))
            return
        for p in range(passes):
            for i, (r0, r1) in enumerate(ranges):
                method.accumulate(task, self._load(ot, cached, i, r0, r1, i == len(ranges) - 1), stats, p)
            method.finish_pass(task, stats, p)
        for i, (r0, r1) in enumerate(ranges):
            c = self._load(ot, cached, i, r0, r1, i == len(ranges) - 1)
            emit(self._detach_from(method.apply(task, c, stats).to(out_dtype), c))

    # -- fused CPU kernels (bf16) -----------------------------------------------------------------------------------
    def _fused(self, ot: OutputTensor):
        task = ot.task
        if self.device.type != "cpu" or task.compute_dtype_name != "float32" or ot.dtype not in ("BF16", "F32"):
            return None
        srcs = self.plan.sources
        for r in self._inputs(ot):
            src = srcs[r.source]
            if not src.unchanged(r.tensor) or src.info(r.tensor).dtype != "BF16":
                return None
        return self.plan.method.fused_cpu(task)

    def _tensor_fused(self, ot: OutputTensor, cached, fused, emit: Callable[[torch.Tensor], None]) -> None:
        """Run a fused kernel straight on memory-mapped input rows (no read copy, no conversion buffers); each
        row block is unmapped as soon as the kernel returns, so mapped pages never exceed ``cache_bytes``."""
        srcs = self.plan.sources
        refs = self._inputs(ot)
        infos = [srcs[r.source].info(r.tensor) for r in refs]
        per_chunk = max(self.chunk_elements, self.cache_bytes // (2 * len(refs)))
        ranges = chunk_ranges(ot.shape, per_chunk)
        has_base = ot.base is not None

        def run(r0: int, r1: int, call) -> None:
            arrays, mms = [], []
            try:
                for info in infos:
                    a, mm = map_rows(info, r0, r1)
                    arrays.append(a)
                    mms.append(mm)
                call(arrays[0] if has_base else None, tuple(arrays[1:] if has_base else arrays))
            finally:
                arrays.clear()  # the arrays export the mmaps' buffers: drop them before closing
                for mm in mms:
                    try:
                        mm.close()
                    except BufferError:  # still referenced (e.g. by a traceback): unmapped when collected
                        pass

        for p in range(fused.passes):
            for r0, r1 in ranges:
                run(r0, r1, lambda b, m: fused.accumulate(b, m, p))
            fused.finish_pass(p)
        bf16 = ot.dtype == "BF16"
        row = ot.task.numel // max(1, ot.shape[0])
        for r0, r1 in ranges:
            out = np.empty((r1 - r0) * row, dtype=np.uint16 if bf16 else np.float32)
            run(r0, r1, lambda b, m: fused.apply(b, m, out if bf16 else None, None if bf16 else out))
            emit(out)  # raw little-endian bf16 bits (uint16) or float32: the writer needs only the bytes

    # -- plain LoRA and casts on the CPU, numba (no torch) --------------------------------------------------------------
    def _lora_fast(self, ot: OutputTensor):
        """``(source, A, B, s)`` when output tensor ``ot`` is a base tensor plus a plain LoRA update that the numpy
        path computes (CPU, bf16/f32 in and out, 2-D, no DoRA/embedding/Conv1D), else None."""
        if ot.task is not None or ot.copy_from is None or self.device.type != "cpu" or not ot.shape or \
                ot.dtype not in ("BF16", "F32"):
            return None
        from .kernels import HAVE_NUMBA

        src = self.plan.sources[ot.copy_from.source]
        name = ot.copy_from.tensor
        if not HAVE_NUMBA or src.info(name).dtype not in ("BF16", "F32"):
            return None
        if src.unchanged(name):  # a cast only (a raw copy when the dtype stays: see run())
            return (src, None, None, None) if src.info(name).dtype != ot.dtype else None
        upd = src.adapter.plain_update(name) if len(ot.shape) == 2 else None
        return None if upd is None else (src, *upd)

    def _tensor_lora(self, ot: OutputTensor, fast, emit: Callable) -> None:
        """Rows of ``W + s·(B @ A)`` (or of ``W`` alone: a cast): PEFT's operation order (product, scale, add),
        float32, rounded once to the output dtype. Base rows come memory-mapped; every output block is a fresh array
        computed before its rows are unmapped."""
        from .kernels import bf16_to_f32, f32_to_bf16, lora_apply

        src, A, B, s = fast
        info = src.info(ot.copy_from.tensor)
        row = math.prod(ot.shape[1:])
        for r0, r1 in chunk_ranges(ot.shape, self.chunk_elements):
            n = (r1 - r0) * row
            arr, mm = map_rows(info, r0, r1)
            try:
                if A is None and info.dtype == "F32":  # float32 → bf16
                    out = np.empty(n, dtype=np.uint16)
                    f32_to_bf16(arr.view(np.float32), out)
                elif A is None:  # bf16 → float32
                    out = np.empty(n, dtype=np.float32)
                    bf16_to_f32(arr, out)
                else:
                    out = np.empty(n, dtype=np.uint16 if ot.dtype == "BF16" else np.float32)
                    bf16_in = info.dtype == "BF16"
                    lora_apply(arr if bf16_in else arr.view(np.float32), bf16_in, B[r0:r1], A, s, out,
                               ot.dtype == "BF16")
            finally:
                del arr
                try:
                    mm.close()
                except BufferError:  # still referenced (e.g. by a traceback): unmapped when collected
                    pass
            emit(out)

    # -- whole run ---------------------------------------------------------------------------------------------------
    def needs_torch(self) -> bool:
        """Whether any tensor takes a torch path (not a raw copy, a fused kernel or the numpy LoRA path)."""
        srcs = self.plan.sources
        for ot in self.plan.tensors:
            if ot.copy_from is not None and ot.task is None:
                src = srcs[ot.copy_from.source]
                if src.unchanged(ot.copy_from.tensor) and src.info(ot.copy_from.tensor).dtype == ot.dtype:
                    continue
                if self._lora_fast(ot) is not None:
                    continue
                return True
            if ot.task is None or self._fused(ot) is None:
                return True
        return False

    def run(self, out_dir: Path, shards: list[ShardInfo]) -> None:
        if self.needs_torch():
            # import it here, in the main thread, before the worker threads start: imported lazily from a worker
            # it costs hundreds of MB more peak RSS (per-thread allocator arenas) and races the other threads
            from .lazy_torch import _load

            _load()
        writer = _Writer()
        order = [ot for s in shards for ot in s.tensors]
        pre = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeline-prefetch")
        pending: "queue.SimpleQueue[Future]" = queue.SimpleQueue()
        it = iter(order)

        def schedule_next() -> None:
            nxt = next(it, None)
            if nxt is not None:
                pending.put(pre.submit(self._prefetch, nxt))

        schedule_next()
        try:
            for shard in shards:
                planned = [PlannedTensor(t.name, t.dtype, t.shape) for t in shard.tensors]
                sw = ShardStreamWriter(out_dir / shard.filename, planned, {"format": "pt"}, fsync=self.fsync,
                                       check_finite=self.check_finite)
                try:
                    for ot in shard.tensors:
                        cached = pending.get().result()
                        schedule_next()
                        src = self.plan.sources[ot.copy_from.source] if ot.copy_from else None
                        if src is not None and src.unchanged(ot.copy_from.tensor) and \
                                src.info(ot.copy_from.tensor).dtype == ot.dtype:
                            info = src.info(ot.copy_from.tensor)
                            writer.submit(lambda sw=sw, name=ot.name, info=info: sw.copy_from_file(name, info))
                        else:
                            def emit(t, sw=sw, name=ot.name) -> None:
                                if is_tensor(t):
                                    t = t.cpu() if t.device.type != "cpu" else t
                                    nbytes = t.numel() * t.element_size()
                                else:  # a numpy array from a fused kernel
                                    nbytes = t.nbytes
                                writer.submit(lambda: sw.write(name, t), nbytes)
                            self._tensor(ot, cached, emit)
                        self.progress(1)
                    writer.drain()
                    sw.close()
                    shard.sha256 = sw.sha256.hexdigest()
                    self.nonfinite.update(sw.nonfinite or {})
                except BaseException:
                    sw.abort()
                    raise
        finally:
            try:
                writer.drain()
            except BaseException:
                pass
            writer.close()
            pre.shutdown(wait=True, cancel_futures=True)
