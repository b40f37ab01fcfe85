"""Run one MergeKit parity case with mergeline and compare its tensors with MergeKit's stored output.

Shared by ``tests/test_mergekit_parity.py`` (against the stored golden files) and ``bench/mergekit_parity.py``
(which can also regenerate those files by running MergeKit itself in ``bench/.venv-mergekit``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tests.parity_models import build_family, input_fingerprint

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "mergekit_golden"
FAMILY_DTYPE = {"bf16": "bfloat16", "f32": "float32"}


def families(root: Path) -> dict[str, dict[str, Path]]:
    return {fam: build_family(Path(root) / fam, dtype) for fam, dtype in FAMILY_DTYPE.items()}


def fingerprints(fams: dict[str, dict[str, Path]]) -> dict[str, str]:
    return {fam: input_fingerprint(paths) for fam, paths in fams.items()}


def resolve(obj, paths: dict[str, Path]):
    """The case config with ``{base}``-style placeholders replaced by the family's paths."""
    if isinstance(obj, dict):
        return {k: resolve(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, paths) for v in obj]
    if isinstance(obj, str):
        return obj.format(**{k: str(v) for k, v in paths.items()})
    return obj


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (all shards) or of one .safetensors file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@dataclass
class Agreement:
    case: str
    tensors: int
    bitwise_tensors: int
    max_abs: float
    mismatch_frac: float
    missing: list[str]
    extra: list[str]
    dtype_mismatch: list[str]

    def ok(self, expect) -> bool:
        if self.missing or self.extra or self.dtype_mismatch:
            return False
        if expect == "bitwise":
            return self.bitwise_tensors == self.tensors
        unknown = set(expect) - {"atol", "frac"}
        if unknown:
            raise ValueError(f"unknown expectation keys {sorted(unknown)}")
        return (self.max_abs <= expect.get("atol", float("inf"))
                and self.mismatch_frac <= expect.get("frac", 1.0))

    def line(self, expect) -> str:
        return (f"{self.case:32s} {self.bitwise_tensors:3d}/{self.tensors:<3d} bitwise  max|Δ| {self.max_abs:.3g}  "
                f"differing {100 * self.mismatch_frac:.3f}%  expect {expect}  "
                f"{'OK' if self.ok(expect) else 'FAIL'}"
                + (f"  missing {self.missing[:3]}" if self.missing else "")
                + (f"  extra {self.extra[:3]}" if self.extra else "")
                + (f"  dtype {self.dtype_mismatch[:3]}" if self.dtype_mismatch else ""))


def compare(case: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Agreement:
    common = sorted(set(ours) & set(theirs))
    bitwise, max_abs, differing, total, dt = 0, 0.0, 0, 0, []
    for k in common:
        a, b = ours[k], theirs[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            dt.append(f"{k}: ours {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            continue
        if torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                       b.view(torch.uint8) if b.dtype == torch.bfloat16 else b):
            bitwise += 1
        d = (a.double() - b.double()).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        differing += int((d > 0).sum())
        total += d.numel()
    return Agreement(case, len(common), bitwise, max_abs, differing / max(total, 1),
                     sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs)), dt)


def run_ours(case: dict, fams: dict[str, dict[str, Path]], out: Path) -> dict[str, torch.Tensor]:
    from merge_ops.api import MergeOptions, merge

    cfg = resolve(case["config"], fams[case["family"]])
    merge(cfg, out, MergeOptions(device="cpu", hash_inputs=False, copy_tokenizer=False))
    return load_tensors(out)


def golden_file(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.safetensors"


def golden_meta() -> dict:
    return json.loads((GOLDEN_DIR / "meta.json").read_text())

