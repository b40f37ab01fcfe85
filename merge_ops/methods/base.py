"""The contract every merge method implements, and the registry that finds methods by name.

A method sees one output tensor at a time, in row blocks ("chunks") so that memory never depends on tensor size.
Methods whose maths needs whole-tensor statistics (a top-k threshold, an L1 norm, a cosine) declare stats passes:
the engine first streams every chunk through :meth:`MergeMethod.accumulate` (``passes`` times), then streams the
chunks again through :meth:`MergeMethod.apply`. When a tensor fits in one chunk, it is read once and both phases run
on the same data.

Adding a method = one module in this package defining a subclass decorated with :func:`register`, plus its import in
``merge_ops/methods/__init__.py``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..lazy_torch import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method accepts. ``scope='model'`` parameters may be set per model (and default from the slice
    and global levels); ``scope='global'`` ones only at the slice or global level."""

    name: str
    default: Any = None
    kind: Literal["float", "int", "bool", "choice"] = "float"
    scope: Literal["model", "global"] = "model"
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""

    def check(self, value: Any, where: str) -> Any:
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ConfigError(f"{where}: '{self.name}' must be true or false, got {value!r}")
        if self.kind == "choice":
            if isinstance(value, bool) and "true" in self.choices:
                return "true" if value else "false"
            if not isinstance(value, str) or value not in self.choices:
                raise ConfigError(f"{where}: '{self.name}' must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{self.name}' must be a number, got {value!r}")
        v = float(value)
        if v != v:
            raise ConfigError(f"{where}: '{self.name}' is NaN; give a finite number")
        if v in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: '{self.name}' = {v}; it must be a finite number")
        if self.kind == "int":
            if v != int(v):
                raise ConfigError(f"{where}: '{self.name}' must be a whole number, got {value!r}")
            if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
                lo = "-inf" if self.lo is None else int(self.lo)
                hi = "inf" if self.hi is None else int(self.hi)
                raise ConfigError(f"{where}: '{self.name}' = {int(v)} is out of range [{lo}, {hi}]")
            return int(v)
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            lo = "-inf" if self.lo is None else self.lo
            hi = "inf" if self.hi is None else self.hi
            raise ConfigError(f"{where}: '{self.name}' = {v} is out of range [{lo}, {hi}]")
        return v


@dataclass
class TensorTask:
    """Everything a method needs to know about one output tensor, with parameters already resolved to values."""

    name: str
    shape: tuple[int, ...]
    has_base: bool
    model_params: list[dict[str, Any]]  # one dict per non-base input, in config order
    params: dict[str, Any]  # global-scope parameters
    seed: int
    compute_dtype_name: str  # "float32" | "float64": a name, so planning never imports torch
    device: Any  # torch.device, or lazy_torch.CpuDevice (a str torch accepts)
    model_labels: list[str] = field(default_factory=list)

    @property
    def compute_dtype(self) -> "torch.dtype":
        return getattr(torch, self.compute_dtype_name)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1



@dataclass
class Chunk:
    """Rows ``[row_start, row_end)`` of every input of one tensor, in the compute dtype on the compute device."""

    index: int
    row_start: int
    row_end: int
    base: torch.Tensor | None
    models: list[torch.Tensor]
    last: bool = True


class MergeMethod:
    """Base class. Subclasses set ``name``, ``base`` and ``params`` and implement :meth:`apply`."""

    name: ClassVar[str]
    base: ClassVar[Literal["required", "optional", "none"]] = "none"
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    min_models: ClassVar[int] = 1  # non-base models
    max_models: ClassVar[int | None] = None
    doc: ClassVar[str] = ""

    # -- validation --------------------------------------------------------------------------------------------------
    @classmethod
    def spec(cls, name: str) -> ParamSpec | None:
        for p in cls.params:
            if p.name == name:
                return p
        return None

    @classmethod
    def check_arity(cls, n_models: int, has_base: bool) -> str | None:
        """Return an error message if this many non-base models (and base or not) cannot be merged."""
        if cls.base == "required" and not has_base:
            return f"merge_method '{cls.name}' needs a 'base_model'"
        if n_models < cls.min_models:
            return f"merge_method '{cls.name}' needs at least {cls.min_models} model(s) besides the base, got {n_models}"
        if cls.max_models is not None and n_models > cls.max_models:
            return f"merge_method '{cls.name}' takes at most {cls.max_models} model(s) besides the base, got {n_models}"
        return None

    def check_task(self, task: TensorTask) -> None:
        """Per-tensor checks on resolved values (e.g. DELLA's density ± epsilon). Raise ConfigError."""

    # -- computation -------------------------------------------------------------------------------------------------
    def stats_passes(self, task: TensorTask, stats: Any) -> int:
        """How many times every chunk must go through :meth:`accumulate` before :meth:`apply` (0 = none)."""
        return 0

    def init_stats(self, task: TensorTask) -> Any:
        return None

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: Any, pass_index: int) -> None:
        raise NotImplementedError

    def finish_pass(self, task: TensorTask, stats: Any, pass_index: int) -> None:
        """Called after every chunk went through :meth:`accumulate` for ``pass_index``."""

    def apply(self, task: TensorTask, chunk: Chunk, stats: Any) -> torch.Tensor:
        raise NotImplementedError

    def fused_cpu(self, task: TensorTask):
        """Optional fast path on raw bf16 inputs (see :mod:`merge_ops.kernels`); None = use :meth:`apply`."""
        return None

    def is_identity(self, task: TensorTask) -> int | None:
        """If the output is exactly one input tensor unchanged, its index (-1 = base, i = model i): the engine then
        copies bytes without decoding."""
        return None


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"merge method '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    from . import _load_all  # noqa: F401  (imports every method module)

    if name not in REGISTRY:
        hint = difflib.get_close_matches(name, list(REGISTRY), n=1)
        raise ConfigError(
            f"merge_method: unknown method '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; available: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


def weighted_sum(tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w_i t_i accumulated in the tensors' dtype.

    Each product is rounded before it is added (no fused multiply-add), so CPU, CUDA and the fused kernels agree
    bit for bit."""
    acc = torch.mul(tensors[0], weights[0], out=out) if out is not None else tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        acc.add_(t * w)
    return acc
