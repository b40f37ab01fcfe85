"""Small helpers shared by the method tests: a config from (model, parameters) pairs, and every output tensor
checked against a float64 expectation."""

from __future__ import annotations

from pathlib import Path

import torch

from tests import oracle


def models_cfg(method: str, base: Path | None, entries: list[tuple[Path, dict]], **top) -> dict:
    cfg = {"merge_method": method, "models": [{"model": str(p), "parameters": dict(prm)} for p, prm in entries]}
    if base is not None:
        cfg["base_model"] = str(base)
    cfg.update(top)
    return cfg


def check_all(out: dict[str, torch.Tensor], names, expected, **tol) -> None:
    """Every output tensor against ``expected(name)`` (float64); the output holds exactly ``names``."""
    assert sorted(out) == sorted(names), f"tensor names differ: {sorted(set(out) ^ set(names))}"
    for name in sorted(names):
        oracle.assert_matches(out[name], expected(name), name, **tol)
