"""The CPU fast path does not import torch: a bf16 ``linear`` merge (every tensor through the fused numba kernel)
runs in a process where importing torch raises, and its output equals the torch path's byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from merge_ops.kernels import HAVE_NUMBA

pytestmark = pytest.mark.skipif(not HAVE_NUMBA, reason="the torch-free path needs numba")

BLOCK = textwrap.dedent("""
    import sys, importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch import blocked by the test")
    sys.meta_path.insert(0, _Block())
    from pipelines.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def test_bf16_linear_merge_runs_without_torch(tiny_family, tmp_path):
    import yaml

    cfg = {"merge_method": "linear", "dtype": "bfloat16",
           "models": [{"model": str(tiny_family[k]), "parameters": {"weight": w}}
                      for k, w in (("base", 0.2), ("ft1", 0.5), ("ft2", 0.3))]}
    path = tmp_path / "linear.yml"
    path.write_text(yaml.safe_dump(cfg))
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "fast"
    proc = subprocess.run([sys.executable, "-c", BLOCK, "merge", str(path), str(out), "--device", "cpu"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    man = json.loads((out / "mergeline.json").read_text())
    assert man["device"].startswith("cpu")

    # the torch path (numba disabled) gives the same bytes
    ref = tmp_path / "torch"
    env = {"MERGELINE_NO_NUMBA": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "merge", str(path), str(ref), "--device", "cpu"],
                          cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    fast, slow = _shards(out), _shards(ref)
    assert fast.keys() == slow.keys() and fast
    assert all(fast[k] == slow[k] for k in fast)


def test_torch_path_still_used_where_needed(tiny_family, tmp_path):
    """A LoRA merge needs torch (matrix products): the lazy import brings it in and the merge succeeds."""
    from merge_ops.api import MergeOptions, merge_lora

    res = merge_lora(tiny_family["base"], tiny_family["lora"], tmp_path / "out", MergeOptions(device="cpu"))
    assert res.tensors > 0
    assert "torch" in sys.modules
