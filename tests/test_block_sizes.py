"""Row-block sizes per device and method (merge_ops.executor.block_sizes): on a GPU, methods with statistics passes
get big blocks (one read per tensor instead of one per pass) while single-pass methods keep the CPU's; the bytes
written never depend on the block sizes."""

from __future__ import annotations

import hashlib

import pytest

from merge_ops import executor as ex_mod
from merge_ops.api import MergeOptions, merge, plan_merge
from merge_ops.executor import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_ELEMENTS, BlockSizes, Executor, block_sizes
from merge_ops.lazy_torch import CpuDevice


def _cfg(method: str, fam: dict, dtype: str = "float32") -> dict:
    params = {"weight": 0.5, "density": 0.5} if method in ("ties", "breadcrumbs") else {"weight": 0.5}
    models = [{"model": str(fam[k]), "parameters": dict(params)} for k in ("ft1", "ft2")]
    cfg = {"merge_method": method, "models": models, "dtype": dtype}
    if method != "linear":
        cfg["base_model"] = str(fam["base"])
    return cfg


def test_cpu_defaults_and_explicit_sizes(monkeypatch):
    monkeypatch.delenv("MERGELINE_CHUNK_ELEMENTS", raising=False)
    monkeypatch.delenv("MERGELINE_CACHE_BYTES", raising=False)
    assert block_sizes(CpuDevice(), None, None) == BlockSizes(DEFAULT_CHUNK_ELEMENTS, DEFAULT_CACHE_BYTES,
                                                              DEFAULT_CHUNK_ELEMENTS, DEFAULT_CACHE_BYTES)
    assert block_sizes(CpuDevice(), 1000, 0) == BlockSizes(1000, 0, 1000, 0)
    monkeypatch.setenv("MERGELINE_CHUNK_ELEMENTS", "4096")
    monkeypatch.setenv("MERGELINE_CACHE_BYTES", "8192")
    assert block_sizes(CpuDevice(), None, None) == BlockSizes(4096, 8192, 4096, 8192)
    assert block_sizes(CpuDevice(), 77, None).chunk_elements == 77  # explicit beats the environment


def test_stats_sizes_apply_only_to_methods_with_statistics(tiny_family):
    for method, has_stats in (("ties", True), ("breadcrumbs", True), ("slerp", True), ("linear", False),
                              ("task_arithmetic", False)):
        cfg = _cfg(method, tiny_family)
        if method == "slerp":
            cfg = {"merge_method": "slerp", "base_model": str(tiny_family["base"]), "dtype": "float32",
                   "parameters": {"t": 0.3}, "models": [{"model": str(tiny_family["base"])},
                                                         {"model": str(tiny_family["ft1"])}]}
        plan = plan_merge(cfg, MergeOptions(device="cpu"))
        ex = Executor(plan, chunk_elements=64, cache_bytes=0, stats_chunk_elements=10**9, stats_cache_bytes=1 << 30)
        big = [t for t in plan.tensors if t.task is not None and t.task.numel > 256 and len(t.shape) == 2]
        assert big, method
        n_ranges = {len(ex._ranges(t)) for t in big}
        assert (n_ranges == {1}) if has_stats else (min(n_ranges) > 1), (method, n_ranges)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "linear"])
def test_bytes_do_not_depend_on_stats_block_sizes(method, tiny_family, tmp_path, monkeypatch):
    """The streamed torch path (float64 compute: the fused bf16 CPU kernels ignore row blocks), small blocks
    everywhere = big blocks for tensors with statistics passes; the spy proves big single blocks were taken."""
    cfg = _cfg(method, tiny_family)
    merge(cfg, tmp_path / "small", MergeOptions(device="cpu", chunk_elements=64, cache_bytes=0, hash_inputs=False,
                                                compute_dtype="float64"))
    monkeypatch.setattr("merge_ops.api.block_sizes", lambda d, c, k: BlockSizes(64, 0, 10**9, 1 << 30))
    seen = []
    real = Executor._ranges
    monkeypatch.setattr(Executor, "_ranges", lambda self, ot: seen.append(r := real(self, ot)) or r)
    merge(cfg, tmp_path / "mixed", MergeOptions(device="cpu", hash_inputs=False, compute_dtype="float64"))
    multi = [r for r in seen if len(r) > 1]
    assert seen and (not multi if method != "linear" else multi), (method, [len(r) for r in seen][:10])

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}

    assert digest(tmp_path / "small") == digest(tmp_path / "mixed")
    assert ex_mod.CUDA_STATS_CHUNK_ELEMENTS > DEFAULT_CHUNK_ELEMENTS
