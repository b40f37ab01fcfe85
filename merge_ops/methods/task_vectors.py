"""Shared machinery of the task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA).

Every member computes δ_i = θ_i − θ_b, sparsifies each δ_i its own way, optionally elects a sign per element (TIES),
combines the weighted deltas, optionally normalizes, and adds λ·mixed to the base. Subclasses only choose the
sparsifier (``sparsify``), whether signs are elected (``elect``) and the ``normalize`` default; each registered
method stays a few lines in its own module.

Streaming: magnitude-based sparsifiers need the exact k-th largest |δ| of the whole tensor (2 radix passes, see
:mod:`merge_ops.topk`); L1 rescaling needs whole-tensor norms (1 pass). Random masks are drawn per (seed, tensor,
model, chunk) on the CPU so they do not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..lazy_torch import torch

from ..errors import ConfigError
from ..topk import TopKSelector
from .base import Chunk, MergeMethod, ParamSpec, TensorTask

WEIGHT = ParamSpec("weight", required=True, doc="per-model weight w_i of the task vector")
DENSITY = ParamSpec("density", 1.0, lo=0.0, hi=1.0, doc="fraction ρ of each task vector kept")
LAMBDA = ParamSpec("lambda", 1.0, scope="global", doc="scale λ applied to the combined task vector")
INT8_MASK = ParamSpec("int8_mask", False, kind="bool", scope="global", doc="accepted for MergeKit compatibility; no effect")
RESCALE = ParamSpec("rescale", True, kind="bool", scope="global", doc="rescale kept entries after random dropping")
RESCALE_MODE = ParamSpec(
    "rescale_mode", "l1", kind="choice", scope="global", choices=("l1", "inverse_density"),
    doc="l1: keep each δ's L1 norm (MergeKit); inverse_density: multiply by 1/ρ (DARE paper)",
)
GAMMA = ParamSpec("gamma", 0.01, lo=0.0, hi=1.0, doc="fraction of largest-magnitude outliers dropped")
EPSILON = ParamSpec("epsilon", 0.15, lo=0.0, hi=1.0, doc="half-width of DELLA's keep-probability ramp")


def normalize_spec(default: bool) -> ParamSpec:
    return ParamSpec("normalize", default, kind="bool", scope="global")


@dataclass
class _ModelState:
    selectors: list[TopKSelector] = field(default_factory=list)
    l1_full: float = 0.0
    l1_kept: float = 0.0
    scale: float = 1.0
    cached_mask: torch.Tensor | None = None  # single-chunk tensors: mask drawn in the stats pass, reused


class TaskVectorMethod(MergeMethod):
    base = "required"
    sparsify: ClassVar[Literal["none", "magnitude", "random", "breadcrumbs", "della"]] = "none"
    elect: ClassVar[bool] = False

    # -- per-tensor validation ---------------------------------------------------------------------------------------
    def check_task(self, task: TensorTask) -> None:
        if self.sparsify == "della":
            for label, p in zip(task.model_labels, task.model_params):
                lo, hi = p["density"] - p["epsilon"], p["density"] + p["epsilon"]
                if not (0.0 < lo and hi < 1.0) and p["density"] < 1.0:
                    raise ConfigError(
                        f"tensor '{task.name}', model {label}: density ± epsilon = [{lo:g}, {hi:g}] must lie inside (0, 1); "
                        f"lower epsilon or move density away from 0 and 1"
                    )
        if not self.elect and task.params.get("normalize"):
            if abs(sum(p["weight"] for p in task.model_params)) < 1e-8:
                raise ConfigError(
                    f"tensor '{task.name}': weights sum to ~0 with normalize: true; change the weights or set normalize: false"
                )

    # -- stats -------------------------------------------------------------------------------------------------------
    def _rescaling(self, task: TensorTask) -> str | None:
        if self.sparsify not in ("random", "della") or not task.params.get("rescale", False):
            return None
        return task.params.get("rescale_mode", "l1")

    def stats_passes(self, task: TensorTask, stats: list[_ModelState]) -> int:
        if self.sparsify in ("magnitude", "breadcrumbs"):
            return max([s.passes for st in stats for s in st.selectors] + [0])
        if self._rescaling(task) == "l1":
            return 1
        return 0

    def init_stats(self, task: TensorTask) -> list[_ModelState]:
        states = []
        n = task.numel
        for p in task.model_params:
            st = _ModelState()
            rho = p.get("density", 1.0)
            if self.sparsify == "magnitude":
                st.selectors = [TopKSelector(n, n if rho >= 1.0 else int(rho * n), task.compute_dtype)]
            elif self.sparsify == "breadcrumbs":
                keep = n if rho >= 1.0 else int(rho * n)
                top = int(p["gamma"] * n)
                if keep + top > n:
                    top = n - keep
                # kept = top-(top+keep) minus top-(top)
                st.selectors = [TopKSelector(n, top + keep, task.compute_dtype), TopKSelector(n, top, task.compute_dtype)]
            states.append(st)
        return states

    def _deltas(self, chunk: Chunk) -> list[torch.Tensor]:
        return [m - chunk.base for m in chunk.models]

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: list[_ModelState], pass_index: int) -> None:
        deltas = self._deltas(chunk)
        for i, (d, st) in enumerate(zip(deltas, stats)):
            if self.sparsify in ("magnitude", "breadcrumbs"):
                mag = d.abs()
                for sel in st.selectors:
                    if pass_index < sel.passes:
                        sel.accumulate(mag)
            else:  # L1 rescale statistics
                mask = self._random_mask(task, chunk, i, d)
                if chunk.last and chunk.index == 0:
                    st.cached_mask = mask
                st.l1_full += float(d.abs().sum(dtype=torch.float64))
                st.l1_kept += float((d.abs() * mask).sum(dtype=torch.float64))

    def finish_pass(self, task: TensorTask, stats: list[_ModelState], pass_index: int) -> None:
        for st in stats:
            for sel in st.selectors:
                if pass_index < sel.passes:
                    sel.finish_pass()
            if self.sparsify in ("random", "della"):
                if st.l1_full < 1e-7 or st.l1_kept < 1e-7:
                    st.scale = 1.0
                else:
                    st.scale = st.l1_full / st.l1_kept

    # -- masks -------------------------------------------------------------------------------------------------------
    def _random_mask(self, task: TensorTask, chunk: Chunk, i: int, d: torch.Tensor) -> torch.Tensor:
        """Bernoulli keep mask from the counter-based generator: element e of the tensor is kept when
        uniform(key, e) < p_e (p = ρ for DARE; DELLA's rank-dependent probability). See :mod:`merge_ops.rng`."""
        from ..rng import stream_key, uniform

        p = task.model_params[i]
        rho = p["density"]
        if rho >= 1.0:
            return torch.ones(d.shape, dtype=torch.bool, device=d.device)
        row_elems = d.numel() // d.shape[0] if d.dim() >= 1 and d.shape[0] else d.numel()
        start = chunk.row_start * row_elems if d.dim() >= 2 else 0
        u = uniform(stream_key(task.seed, task.name, i), start, d.numel(), d.device).reshape(d.shape)
        if self.sparsify == "random":
            return u < rho
        # della: per row, keep probability rises linearly with the magnitude rank from ρ-ε to ρ+ε
        eps = p["epsilon"]
        rows = d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)
        n = rows.shape[1]
        # rank of each |δ| within its row (ties by index): one stable sort, then scatter the positions back
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        ranks = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        ranks.scatter_(1, order, torch.arange(n, dtype=torch.float32, device=rows.device).expand(rows.shape[0], n))
        if n > 1:
            probs = (rho - eps) + (2 * eps / (n - 1)) * ranks
        else:
            probs = torch.full_like(ranks, rho)
        return (u.reshape(rows.shape) < probs).reshape(d.shape)

    def _mask(self, task: TensorTask, chunk: Chunk, i: int, d: torch.Tensor, st: _ModelState) -> tuple[torch.Tensor | None, float]:
        """Keep mask of δ_i for this chunk (None = keep all) and the rescale factor."""
        if self.sparsify == "none":
            return None, 1.0
        if self.sparsify == "magnitude":
            sel = st.selectors[0]
            if sel.trivial and sel.k == sel.numel:
                return None, 1.0
            return sel.mask(d.abs()), 1.0
        if self.sparsify == "breadcrumbs":
            mag = d.abs()
            big, small = st.selectors
            return big.mask(mag) & ~small.mask(mag), 1.0
        mask = st.cached_mask if st.cached_mask is not None else self._random_mask(task, chunk, i, d)
        mode = self._rescaling(task)
        if mode == "l1":
            return mask, st.scale
        if mode == "inverse_density":
            rho = task.model_params[i]["density"]
            return mask, (1.0 / rho if rho > 0 else 1.0)
        return mask, 1.0

    def fused_cpu(self, task: TensorTask):
        from ..kernels import HAVE_NUMBA, FusedTaskVector
        from ..topk import SMALL

        if not HAVE_NUMBA or self.sparsify not in ("none", "magnitude", "breadcrumbs", "random") or \
                task.numel <= SMALL:
            return None
        n = task.numel
        if self.sparsify == "random":
            from ..rng import stream_key

            weights = [p["weight"] for p in task.model_params]
            random = ([stream_key(task.seed, task.name, i) for i in range(len(weights))],
                      [p["density"] for p in task.model_params], self._rescaling(task))
            return FusedTaskVector(n, [n] * len(weights), weights, self.elect, task.params["normalize"],
                                   task.params["lambda"], None, random)
        ks, ks_lo = [], []
        for p in task.model_params:
            keep = n if self.sparsify == "none" or p.get("density", 1.0) >= 1.0 else int(p["density"] * n)
            top = 0
            if self.sparsify == "breadcrumbs":
                top = int(p["gamma"] * n)
                if keep + top > n:
                    top = n - keep
            ks.append(keep + top)
            ks_lo.append(top)
        return FusedTaskVector(n, ks, [p["weight"] for p in task.model_params], self.elect,
                               task.params["normalize"], task.params["lambda"], ks_lo)

    # -- combine -----------------------------------------------------------------------------------------------------
    def apply(self, task: TensorTask, chunk: Chunk, stats: list[_ModelState] | None) -> torch.Tensor:
        if stats is None:
            stats = self.init_stats(task)
        deltas = self._deltas(chunk)
        weighted = []
        weights = [p["weight"] for p in task.model_params]
        for i, (d, st) in enumerate(zip(deltas, stats)):
            mask, scale = self._mask(task, chunk, i, d, st)
            if mask is not None:
                d.mul_(mask)
            w = weights[i] * scale
            weighted.append(d.mul_(w))
        normalize = task.params["normalize"]
        if self.elect:
            total = weighted[0].clone()
            for x in weighted[1:]:
                total.add_(x)
            positive = total >= 0
            mixed = torch.zeros_like(total)
            divisor = torch.zeros_like(total) if normalize else None
            for x, w in zip(weighted, weights):
                agree = torch.where(positive, x > 0, x < 0)
                mixed.add_(x * agree)
                if divisor is not None:
                    divisor.add_(agree.to(divisor.dtype), alpha=w)
            if divisor is not None:
                divisor[divisor == 0] = 1.0
                mixed.div_(divisor)
        else:
            mixed = weighted[0]
            for x in weighted[1:]:
                mixed.add_(x)
            if normalize:  # the float32 sum, as a tensor: a true division like MergeKit's (not ×1/Σw)
                from ..kernels import float32_sum

                total = sum(weights) if mixed.dtype == torch.float64 else float(float32_sum(weights))
                mixed.div_(torch.tensor(total, dtype=mixed.dtype, device=mixed.device))
        lam = task.params["lambda"]
        return chunk.base + mixed * lam if lam != 1.0 else chunk.base + mixed
