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


def test_plain_lora_merge_runs_without_torch(tiny_family, tmp_path):
    """merge-lora of a plain LoRA (one numba pass per row) in a process where torch cannot be imported; the
    result equals the torch path's (numba disabled) to float32 rounding of the matrix product."""
    import numpy as np
    from safetensors.numpy import load_file

    repo = Path(__file__).resolve().parent.parent
    fast, ref = tmp_path / "fast", tmp_path / "torch"
    args = ["merge-lora", str(tiny_family["base"]), str(tiny_family["lora"])]
    proc = subprocess.run([sys.executable, "-c", BLOCK, *args, str(fast), "--dtype", "float32"], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args, str(ref), "--dtype", "float32"],
                          cwd=repo, capture_output=True, text=True, timeout=300,
                          env={"MERGELINE_NO_NUMBA": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    a = {k: v for f in sorted(fast.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(ref.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and a
    changed = 0
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
        changed += int(not np.array_equal(a[k], load_base(tiny_family["base"], k)))
    assert changed > 0  # the adapter really changed something


def load_base(base: Path, key: str):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    for f in sorted(base.glob("*.safetensors")):
        t = load_file(f)
        if key in t:
            return t[key].to(torch.float32).numpy().astype(np.float32)
    raise KeyError(key)
