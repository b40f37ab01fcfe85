"""The fused numba kernels compute exactly what the torch path computes (bit for bit), including the TIES tie rule
when many bf16 deltas equal the threshold, whole-tensor and streamed in row blocks."""

from __future__ import annotations

import pytest
import torch

import merge_ops.kernels as K
from merge_ops.api import MergeOptions, merge
from tests.tiny_models import load_state, save_tiny_llama, save_variant

pytestmark = pytest.mark.skipif(not K.HAVE_NUMBA, reason="numba not installed")


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Tensors above the fused-kernel size threshold (2^18 elements)."""
    root = tmp_path_factory.mktemp("wide")
    base = save_tiny_llama(root / "base", seed=0, dtype=torch.bfloat16, num_layers=1, hidden=512, vocab=1024,
                           tokenizer=False)
    fts = [save_variant(base, root / f"ft{i}", seed=i, scale=0.02) for i in (1, 2, 3)]
    # coarse deltas: many |δ| equal the top-k threshold
    coarse = save_variant(base, root / "coarse", seed=9, scale=0.5)
    return base, fts, coarse


def both_paths(cfg, tmp_path, name, options):
    merge(cfg, tmp_path / f"{name}-fused", options)
    K.HAVE_NUMBA = False
    try:
        merge(cfg, tmp_path / f"{name}-torch", options)
    finally:
        K.HAVE_NUMBA = True
    return load_state(tmp_path / f"{name}-fused"), load_state(tmp_path / f"{name}-torch")


CASES = {
    "ties": ("ties", {"density": 0.5}, {"lambda": 0.9}),
    "ties-density-0-and-1": ("ties", None, {"normalize": False}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.02}, {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", {}, {"lambda": 1.3, "normalize": True}),
    "dare_ties": ("dare_ties", {"density": 0.4}, {"normalize": True}),
    "dare_linear-inverse": ("dare_linear", {"density": 0.7}, {"rescale_mode": "inverse_density"}),
    "linear": ("linear", {}, {}),
}


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_torch(wide_family, tmp_path, case, streamed):
    base, fts, coarse = wide_family
    method, extra, glob = CASES[case]
    models = fts[:2] + [coarse]
    weights = [0.5, -0.3, 0.4]
    if extra is None:  # one model at density 0, one at 1, one in between
        params = [{"weight": w, "density": d} for w, d in zip(weights, [0.0, 1.0, 0.37])]
    else:
        params = [{"weight": w, **extra} for w in weights]
    cfg = {"merge_method": method, "base_model": str(base), "parameters": glob,
           "models": [{"model": str(m), "parameters": p} for m, p in zip(models, params)]}
    options = MergeOptions(device="cpu", chunk_elements=150000, cache_bytes=0) if streamed else MergeOptions(device="cpu")
    fused, ref = both_paths(cfg, tmp_path, case, options)
    assert set(fused) == set(ref)
    for k in ref:
        if method == "dare_ties":
            # the L1 rescale factor is a float64 sum taken in a different order: allow 1 bf16 ulp, rarely
            diff = (fused[k].float() - ref[k].float()).abs()
            ulp = ref[k].float().abs().clamp_min(1e-30) * 2 ** -7
            assert bool((diff <= ulp).all()), k
            assert int((diff > 0).sum()) <= max(4, ref[k].numel() // 1000), k
        else:
            assert torch.equal(fused[k], ref[k]), (k, (fused[k].float() - ref[k].float()).abs().max())


@pytest.mark.parametrize("n_models,normalize", [(3, True), (2, False), (6, True)], ids=["3-norm", "2-nonorm", "6-norm"])
def test_fused_linear_equals_torch(wide_family, tmp_path, n_models, normalize):
    """The fused linear kernels (≤ 4 inputs: one register pass; more: the tile kernel) and the torch path both use
    MergeKit's order — first product rounded, later ones fused in (FMA), one division by the float32 weight sum — so
    they agree bit for bit."""
    base, fts, coarse = wide_family
    pool = [base, *fts, coarse]
    models = [pool[i % len(pool)] for i in range(n_models)]
    weights = [0.7, -0.2, 0.45, 0.3, 0.11, 0.9][:n_models]
    cfg = {"merge_method": "linear", "parameters": {"normalize": normalize},
           "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)]}
    fused, ref = both_paths(cfg, tmp_path, f"linear{n_models}", MergeOptions(device="cpu"))
    assert set(fused) == set(ref)
    for k in ref:
        assert torch.equal(fused[k], ref[k]), (k, (fused[k].float() - ref[k].float()).abs().max())


def test_fused_path_is_actually_used(wide_family, monkeypatch):
    base, fts, _ = wide_family
    calls = []
    real = K.task_vector_apply

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(K, "task_vector_apply", spy)
    from merge_ops.api import plan_merge
    from merge_ops.executor import Executor

    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in fts[:2]]}
    plan = plan_merge(cfg, MergeOptions(device="cpu"))
    big = [t for t in plan.tensors if t.task is not None and t.task.numel > 2**18]
    assert big and all(Executor(plan)._fused(t) is not None for t in big)


def test_counter_rng_matches_between_torch_and_numba():
    import numpy as np

    from merge_ops.rng import stream_key, uniform

    key = stream_key(7, "model.layers.0.mlp.up_proj.weight", 2)
    u = uniform(key, 123456789, 5000)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
    base = np.zeros(5000, dtype=np.uint16)
    models = np.zeros((1, 5000), dtype=np.uint16)
    # the numba generator drives random_l1_stats; compare through a tiny kernel call per element instead
    with np.errstate(over="ignore"):  # uint64 wrap-around is the point
        got = np.array([K._uniform.py_func(np.uint64(key), 123456789 + j) for j in range(200)], dtype=np.float32)
    assert np.array_equal(got, u[:200].numpy())
    assert torch.equal(uniform(key, 10, 100)[5:], uniform(key, 15, 95))  # depends only on the index


@pytest.mark.parametrize("bf16_in,bf16_out", [(True, True), (True, False), (False, True), (False, False)])
def test_lora_kernel_matches_a_float64_reference(bf16_in, bf16_out):
    """W + s·(B @ A) per row block (the CPU LoRA path): float32 within 1e-6 of a float64 reference; bf16 output is
    that value rounded to nearest even, except where float32 summation order moves it across a rounding boundary."""
    import numpy as np
    import torch

    from merge_ops.kernels import lora_apply

    rng = np.random.default_rng(7)
    rows, cols, r, s = 300, 96, 8, 1.7
    W = torch.from_numpy(rng.normal(size=(rows, cols)).astype(np.float32) * 0.05)
    if bf16_in:
        W = W.to(torch.bfloat16)
    B = rng.normal(size=(rows, r)).astype(np.float32) * 0.02
    A = rng.normal(size=(r, cols)).astype(np.float32) * 0.02
    ref = W.double() + s * (torch.from_numpy(B).double() @ torch.from_numpy(A).double())
    w = W.view(torch.int16).numpy().view(np.uint16).reshape(-1) if bf16_in else W.numpy().reshape(-1)
    out = np.empty(rows * cols, dtype=np.uint16 if bf16_out else np.float32)
    lora_apply(w, bf16_in, B, A, s, out, bf16_out)
    if bf16_out:
        got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).double().reshape(rows, cols)
        want = ref.to(torch.bfloat16).double()
        assert (got != want).double().mean() < 1e-3  # rounding-boundary cases only
        assert torch.allclose(got, ref, rtol=2 ** -8, atol=0)
    else:
        assert np.abs(out.reshape(rows, cols) - ref.numpy()).max() < 1e-6
