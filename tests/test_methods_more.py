"""The MergeKit 0.1.5 methods added after the first set (multislerp, karcher, sce, nearswap, arcee_fusion) against the
independent float64 oracle in tests/oracle.py, plus their edge cases and parameter validation.

Same approach and tolerances as tests/test_methods_reference.py: tiny Llama checkpoints, ``merge_ops.api.merge``, every
output tensor compared with the oracle (float32 output: 1e-5 relative to the tensor's magnitude; bf16: 1 ulp of the
rounded oracle), chunked runs (``chunk_elements=64, cache_bytes=0``) bit-identical to unchunked ones. Agreement with
MergeKit itself is measured by bench/mergekit_methods_check.py (MergeKit is not installed in CI).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import merge_ops.topk as topk_mod
from merge_ops.api import MergeOptions, merge
from merge_ops.errors import ConfigError, InputError
from tests import oracle
from tests.merge_helpers import check_all
from tests.merge_helpers import models_cfg as cfg_of
from tests.tiny_models import load_state, save_tiny_llama, save_variant

NUM_LAYERS = 3
HIDDEN = 32
VOCAB = 64
ZEROED = "model.layers.0.self_attn.q_proj.weight"
CHUNKED = dict(chunk_elements=64, cache_bytes=0)


def write_model(template: Path, out: Path, sd: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / "config.json", out / "config.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class Zoo:
    def __init__(self, root: Path):
        kw = dict(num_layers=NUM_LAYERS, hidden=HIDDEN, vocab=VOCAB, tokenizer=False)
        self.base = save_tiny_llama(root / "base", seed=1, **kw)
        self.a = save_variant(self.base, root / "a", seed=11, scale=0.05)
        self.b = save_variant(self.base, root / "b", seed=12, scale=0.10)
        self.c = save_variant(self.base, root / "c", seed=13, scale=0.08)
        self.a_copy = Path(shutil.copytree(self.a, root / "a_copy"))
        self.base_copy = Path(shutil.copytree(self.base, root / "base_copy"))
        a_sd = load_state(self.a)
        self.neg_a = write_model(self.base, root / "neg_a", {k: -v for k, v in a_sd.items()})
        zeroed = dict(a_sd)
        zeroed[ZEROED] = torch.zeros_like(zeroed[ZEROED])
        self.a_zeroed = write_model(self.base, root / "a_zeroed", zeroed)
        self.neg_a_zeroed = write_model(self.base, root / "neg_a_zeroed", {k: -v for k, v in zeroed.items()})
        # sparse task vectors (each keeps a random ~40 % of a model's delta): RAM's unique / overlapping entries
        g = torch.Generator().manual_seed(7)
        base_sd = load_state(self.base)
        self.sparse = []
        for i, src in enumerate((self.a, self.b, self.c)):
            sd = {k: torch.where(torch.rand(v.shape, generator=g) < 0.4, v, base_sd[k])
                  for k, v in load_state(src).items()}
            self.sparse.append(write_model(self.base, root / f"sparse{i}", sd))
        self.base16 = save_tiny_llama(root / "base_bf16", seed=1, dtype=torch.bfloat16, **kw)
        self.a16 = save_variant(self.base16, root / "a_bf16", seed=21, scale=0.05)
        self.b16 = save_variant(self.base16, root / "b_bf16", seed=22, scale=0.08)
        self._states: dict[Path, dict[str, torch.Tensor]] = {}

    def sd(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._states:
            self._states[path] = load_state(path)
        return self._states[path]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo_more"))


_counter = [0]


def run(cfg: dict, root: Path, **opts) -> dict[str, torch.Tensor]:
    _counter[0] += 1
    out = root / f"out{_counter[0]}"
    merge(cfg, out, MergeOptions(device="cpu", hash_inputs=False, copy_tokenizer=False, **opts))
    return load_state(out)


def assert_nothing_written(root: Path) -> None:
    """A failed merge leaves neither an output directory nor temporary files under ``root``."""
    assert not root.exists() or not any(root.rglob("*")), sorted(root.rglob("*"))


def t_of(name: str) -> float:
    return oracle.gradient_t(name, NUM_LAYERS)


def assert_bitwise_equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{k} differs"


# -- multislerp ------------------------------------------------------------------------------------------------------
W_FILTER = [{"filter": "self_attn", "value": 0.7}, {"value": [0.2, 0.6]}]


@pytest.mark.parametrize("case", ["base", "no-base-unnormalized", "gradient-filter"])
def test_multislerp(zoo, tmp_path, case):
    models = [zoo.a, zoo.b, zoo.c]
    weights = [0.5, 0.3, 0.2] if case != "gradient-filter" else [[1.0, 0.2], W_FILTER, 0.4]
    top = {"parameters": {"normalize_weights": False}} if case == "no-base-unnormalized" else {}
    base = None if case == "no-base-unnormalized" else zoo.base
    out = run(cfg_of("multislerp", base, [(m, {"weight": w}) for m, w in zip(models, weights)], **top), tmp_path)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]

    def want(n):
        ws = [oracle.resolve(w, n, t_of(n)) for w in weights]
        return oracle.multislerp([s[n] for s in sds], ws, None if base is None else B[n],
                                 normalize_weights=case != "no-base-unnormalized")

    check_all(out, B, want)


def test_multislerp_edge_cases(zoo, tmp_path):
    """One model = that model, bit for bit; identical models = that model; a zero task vector (a model equal to the
    base) contributes a zero unit vector but still its weight."""
    A, B = zoo.sd(zoo.a), zoo.sd(zoo.base)
    out = run(cfg_of("multislerp", zoo.base, [(zoo.a, {"weight": 0.3})]), tmp_path)
    assert_bitwise_equal(out, A)
    out = run(cfg_of("multislerp", None, [(zoo.a, {"weight": 0.3}), (zoo.a_copy, {"weight": 0.6})]), tmp_path)
    check_all(out, A, lambda n: oracle.f64(A[n]))
    out = run(cfg_of("multislerp", zoo.base, [(zoo.a, {"weight": 0.5}), (zoo.base_copy, {"weight": 0.25}),
                                               (zoo.b, {"weight": 0.25})]), tmp_path)
    Bm = zoo.sd(zoo.b)
    check_all(out, B, lambda n: oracle.multislerp([A[n], B[n], Bm[n]], [0.5, 0.25, 0.25], B[n]))
    # the exact expectation for the zero-vector case, written out: with a, b orthogonal-ish it is not a/b alone
    n = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(out[n], A[n]) and not torch.allclose(out[n], Bm[n])


def test_multislerp_antipodal(zoo, tmp_path):
    """Two antipodal models with equal weights fall back to the weighted sum (here 0); three whose weighted unit
    vectors cancel have no barycentre: a clear error naming the tensor, and no output directory."""
    A = zoo.sd(zoo.a)
    out = run(cfg_of("multislerp", None, [(zoo.a, {"weight": 1.0}), (zoo.neg_a, {"weight": 1.0})]), tmp_path)
    check_all(out, A, lambda n: torch.zeros_like(A[n], dtype=torch.float64))
    cfg = cfg_of("multislerp", None, [(zoo.a, {"weight": 0.25}), (zoo.neg_a, {"weight": 0.5}),
                                      (zoo.a_copy, {"weight": 0.25})])
    with pytest.raises(InputError, match="antipodal"):
        run(cfg, tmp_path / "anti")
    assert_nothing_written(tmp_path / "anti")


def test_multislerp_zero_vector_with_eps_zero_is_an_error(zoo, tmp_path):
    """A zero task vector has no direction: with eps 0 that is a clear error naming the tensor, not NaNs."""
    cfg = cfg_of("multislerp", zoo.base, [(zoo.a, {"weight": 0.5}), (zoo.base_copy, {"weight": 0.5})],
                 parameters={"eps": 0.0})
    with pytest.raises(InputError, match=r"tensor '.*'.*eps > 0"):
        run(cfg, tmp_path / "o")
    assert_nothing_written(tmp_path / "o")


def test_multislerp_weights_summing_to_zero(zoo, tmp_path):
    cfg = cfg_of("multislerp", zoo.base, [(zoo.a, {"weight": 0.5}), (zoo.b, {"weight": -0.5})])
    with pytest.raises(ConfigError, match="normalize_weights"):
        run(cfg, tmp_path / "o")
    assert_nothing_written(tmp_path / "o")
    cfg["parameters"] = {"normalize_weights": False}
    out = run(cfg, tmp_path)
    A, B, Bm = zoo.sd(zoo.a), zoo.sd(zoo.base), zoo.sd(zoo.b)
    check_all(out, B, lambda n: oracle.multislerp([A[n], Bm[n]], [0.5, -0.5], B[n], normalize_weights=False))


# -- karcher ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["three", "base-is-an-input", "params", "max_iter-0"])
def test_karcher(zoo, tmp_path, case):
    B = zoo.sd(zoo.base)
    if case == "base-is-an-input":  # MergeKit adds base_model to the inputs; karcher averages all of them
        models, base, prm = [zoo.a, zoo.b], zoo.base, {}
        inputs = [zoo.a, zoo.b, zoo.base]
    else:
        models, base, inputs = [zoo.a, zoo.b, zoo.c], None, [zoo.a, zoo.b, zoo.c]
        prm = {"params": {"max_iter": 3, "tol": 1e-3}, "max_iter-0": {"max_iter": 0}}.get(case, {})
    out = run(cfg_of("karcher", base, [(m, {}) for m in models], **({"parameters": prm} if prm else {})), tmp_path)
    sds = [zoo.sd(m) for m in inputs]
    check_all(out, B, lambda n: oracle.karcher([s[n] for s in sds], **prm))


def test_karcher_edge_cases(zoo, tmp_path):
    """One model = that model (bit for bit); identical models = that model; a zero tensor in one model is left out
    of the mean but still counts in the norm scale."""
    A = zoo.sd(zoo.a)
    assert_bitwise_equal(run(cfg_of("karcher", None, [(zoo.a, {})]), tmp_path), A)
    check_all(run(cfg_of("karcher", None, [(zoo.a, {}), (zoo.a_copy, {})]), tmp_path), A, lambda n: oracle.f64(A[n]))
    Z, Bm = zoo.sd(zoo.a_zeroed), zoo.sd(zoo.b)
    out = run(cfg_of("karcher", None, [(zoo.a_zeroed, {}), (zoo.b, {})]), tmp_path)
    check_all(out, A, lambda n: oracle.karcher([Z[n], Bm[n]]))
    oracle.assert_matches(out[ZEROED], 0.5 * oracle.f64(Bm[ZEROED]), ZEROED)
    # exactly antipodal inputs (a, −a): MergeKit's fallback (the first unit vector, no step); the zero tensor with
    # its negation (both zero): zero, not NaN
    out = run(cfg_of("karcher", None, [(zoo.a_zeroed, {}), (zoo.neg_a_zeroed, {})]), tmp_path)
    N = zoo.sd(zoo.neg_a_zeroed)
    check_all(out, A, lambda n: oracle.karcher([Z[n], N[n]]))
    n = "model.layers.1.mlp.down_proj.weight"
    oracle.assert_matches(out[n], oracle.f64(A[n]), n)  # norm scale × u_a = a itself
    assert torch.equal(out[ZEROED], torch.zeros_like(out[ZEROED]))


@pytest.mark.parametrize("params, msg", [({"max_iter": 2.5}, "whole number"), ({"max_iter": -1}, "out of range"),
                                         ({"max_iter": [1, 5]}, "single value"), ({"tol": -1e-3}, "out of range")])
def test_karcher_parameter_errors(zoo, tmp_path, params, msg):
    with pytest.raises(ConfigError, match=msg):
        run(cfg_of("karcher", None, [(zoo.a, {}), (zoo.b, {})], parameters=params), tmp_path / "o")
    assert_nothing_written(tmp_path / "o")


# -- sce -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["topk-0.3", "topk-1", "topk-0", "gradient", "one-model", "bf16"])
def test_sce(zoo, tmp_path, case):
    base, models = zoo.base, [zoo.a, zoo.b, zoo.c]
    topk: object = {"topk-0.3": 0.3, "topk-1": 1.0, "topk-0": 0.0, "gradient": [0.1, 0.9], "one-model": 0.5,
                    "bf16": 0.4}[case]
    if case == "one-model":
        models = [zoo.a]  # a single task vector has zero variance everywhere: nothing is selected → the base
    if case == "bf16":
        base, models = zoo.base16, [zoo.a16, zoo.b16]
    out = run(cfg_of("sce", base, [(m, {}) for m in models], parameters={"select_topk": topk}), tmp_path)
    B, sds = zoo.sd(base), [zoo.sd(m) for m in models]
    check_all(out, B, lambda n: oracle.sce(B[n], [s[n] for s in sds], select_topk=oracle.resolve(topk, n, t_of(n))))
    if case == "one-model":
        check_all(out, B, lambda n: oracle.f64(B[n]))


@pytest.mark.parametrize("where, params, msg", [
    ("global", {"select_topk": 1.5}, "out of range"),
    ("model", {"weight": 0.5}, "no parameter 'weight'"),
    ("model", {"select_topk": 0.5}, "top-level 'parameters'"),
])
def test_sce_parameter_errors(zoo, tmp_path, where, params, msg):
    entries = [(zoo.a, params if where == "model" else {}), (zoo.b, {})]
    cfg = cfg_of("sce", zoo.base, entries, **({"parameters": params} if where == "global" else {}))
    with pytest.raises(ConfigError, match=msg):
        run(cfg, tmp_path / "o")


# -- nearswap --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.001, [0.0, 0.02], 1e9])
def test_nearswap(zoo, tmp_path, t):
    out = run(cfg_of("nearswap", zoo.base, [(zoo.base, {}), (zoo.b, {})], parameters={"t": t}), tmp_path)
    B, Bm = zoo.sd(zoo.base), zoo.sd(zoo.b)
    check_all(out, B, lambda n: oracle.nearswap(B[n], Bm[n], oracle.resolve(t, n, t_of(n))))
    if t == 1e9:  # every difference is within t: the other model, exactly
        assert_bitwise_equal(out, Bm)
    if t == 0.001:  # a real blend: about half the elements swapped (|Δ| ≤ t), the rest pulled part of the way
        n = "model.layers.1.mlp.up_proj.weight"
        swapped, kept = float((out[n] == Bm[n]).float().mean()), float((out[n] == B[n]).float().mean())
        assert 0.2 < swapped < 0.8 and kept == 0.0, (swapped, kept)


def test_nearswap_identical_model_and_errors(zoo, tmp_path):
    B = zoo.sd(zoo.base)
    assert_bitwise_equal(run(cfg_of("nearswap", zoo.base, [(zoo.base_copy, {})], parameters={"t": 0.01}), tmp_path), B)
    with pytest.raises(ConfigError, match="out of range"):
        run(cfg_of("nearswap", zoo.base, [(zoo.a, {})], parameters={"t": -0.1}), tmp_path / "o")
    with pytest.raises(ConfigError, match="at most 1 model"):
        run(cfg_of("nearswap", zoo.base, [(zoo.a, {}), (zoo.b, {})], parameters={"t": 0.1}), tmp_path / "o")
    with pytest.raises(ConfigError, match="parameters.t: required"):
        run(cfg_of("nearswap", zoo.base, [(zoo.a, {})]), tmp_path / "o")


# -- arcee_fusion ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_arcee_fusion(zoo, tmp_path, dtype):
    base, other = (zoo.base, zoo.b) if dtype == "float32" else (zoo.base16, zoo.a16)
    out = run(cfg_of("arcee_fusion", base, [(base, {}), (other, {})]), tmp_path)
    B, O = zoo.sd(base), zoo.sd(other)
    check_all(out, B, lambda n: oracle.arcee_fusion(B[n], O[n]))
    n = "model.layers.2.self_attn.o_proj.weight"  # a real selection: some elements taken, most kept
    taken = float((out[n] == O[n]).float().mean())
    assert 0.0 < taken < 0.5, taken


def test_arcee_fusion_identical_and_arity(zoo, tmp_path):
    B = zoo.sd(zoo.base)
    assert_bitwise_equal(run(cfg_of("arcee_fusion", zoo.base, [(zoo.base_copy, {})]), tmp_path), B)
    with pytest.raises(ConfigError, match="at most 1 model"):
        run(cfg_of("arcee_fusion", zoo.base, [(zoo.a, {}), (zoo.b, {})]), tmp_path / "o")
    with pytest.raises(ConfigError, match="base_model"):
        run(cfg_of("arcee_fusion", None, [(zoo.a, {}), (zoo.b, {})]), tmp_path / "o")


# -- ram / ramplus_tl ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, params", [("ram", {}), ("ram", {"epsilon": 0.002}),
                                            ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.5, "alpha": 1.0})])
def test_ram(zoo, tmp_path, method, params):
    out = run(cfg_of(method, zoo.base, [(m, {}) for m in zoo.sparse], **({"parameters": params} if params else {})),
              tmp_path)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in zoo.sparse]
    r = params.get("r", 0.1) if method == "ramplus_tl" else None
    check_all(out, B, lambda n: oracle.ram(B[n], [s[n] for s in sds], epsilon=params.get("epsilon", 1e-5), r=r,
                                           alpha=params.get("alpha", 0.2)))
    # the case split is real: this tensor has unique, shared and untouched elements
    n = "model.layers.1.mlp.up_proj.weight"
    count = sum(((s[n] - B[n]).abs() > params.get("epsilon", 1e-5)).int() for s in sds)
    assert {0, 1, 2} <= set(count.unique().tolist())


def test_ramplus_scales_unique_entries_up(zoo, tmp_path):
    """RAM+ differs from RAM only on single-contributor entries, and moves them further from the base."""
    entries = [(m, {}) for m in zoo.sparse]
    plain = run(cfg_of("ram", zoo.base, entries), tmp_path)
    plus = run(cfg_of("ramplus_tl", zoo.base, entries, parameters={"r": 0.5, "alpha": 1.0}), tmp_path)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in zoo.sparse]
    n = "model.layers.2.self_attn.v_proj.weight"
    count = sum(((s[n] - B[n]).abs() > 1e-5).int() for s in sds)
    changed = plus[n] != plain[n]
    assert changed.any() and bool((count[changed] == 1).all())
    assert bool(((plus[n] - B[n]).abs()[changed] > (plain[n] - B[n]).abs()[changed]).all())


@pytest.mark.parametrize("method, params, msg", [("ram", {"epsilon": -1.0}, "out of range"),
                                                 ("ramplus_tl", {"alpha": -0.1}, "out of range"),
                                                 ("ram", {"r": 0.1}, "has no parameter .r.")])
def test_ram_parameter_errors(zoo, tmp_path, method, params, msg):
    with pytest.raises(ConfigError, match=msg):
        run(cfg_of(method, zoo.base, [(zoo.a, {}), (zoo.b, {})], parameters=params), tmp_path / "o")


# -- streaming: row blocks and the radix-select path give the same bits ------------------------------------------------
def _cases(z: Zoo) -> dict[str, dict]:
    return {
        "multislerp": cfg_of("multislerp", z.base, [(z.a, {"weight": 0.5}), (z.b, {"weight": 0.3}),
                                                     (z.c, {"weight": 0.2})]),
        "karcher": cfg_of("karcher", z.base, [(z.a, {}), (z.b, {})]),
        "sce": cfg_of("sce", z.base, [(z.a, {}), (z.b, {}), (z.c, {})], parameters={"select_topk": 0.3}),
        "nearswap": cfg_of("nearswap", z.base, [(z.b, {})], parameters={"t": 0.004}),
        "arcee_fusion": cfg_of("arcee_fusion", z.base, [(z.b, {})]),
        "ram": cfg_of("ram", z.base, [(m, {}) for m in z.sparse]),
        "ramplus_tl": cfg_of("ramplus_tl", z.base, [(m, {}) for m in z.sparse]),
    }


@pytest.mark.parametrize("method", ["multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_chunked_equals_unchunked(zoo, tmp_path, method):
    cfg = _cases(zoo)[method]
    assert_bitwise_equal(run(cfg, tmp_path, **CHUNKED), run(cfg, tmp_path))


@pytest.mark.parametrize("method", ["sce", "arcee_fusion"])
def test_radix_selection_path_equals_sort_path(zoo, tmp_path, monkeypatch, method):
    """Tensors above topk.SMALL elements select by histogram passes instead of one sort; force that path on the tiny
    models (chunked, so selection state crosses row blocks) and expect the same bits."""
    cfg = _cases(zoo)[method]
    want = run(cfg, tmp_path)
    monkeypatch.setattr(topk_mod, "SMALL", 16)
    monkeypatch.setattr(f"merge_ops.methods.{method}.SMALL", 16)
    # row blocks of 512 elements: the selection state still crosses blocks, with fewer 65 536-bin histograms
    assert_bitwise_equal(run(cfg, tmp_path, chunk_elements=512, cache_bytes=0), want)


def test_float64_compute(zoo, tmp_path):
    """dtype: float64 runs the math in float64 (output float64) and still matches the oracle."""
    cfg = _cases(zoo)["sce"]
    cfg["dtype"] = "float64"
    out = run(cfg, tmp_path)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in (zoo.a, zoo.b, zoo.c)]
    assert all(v.dtype == torch.float64 for v in out.values())
    check_all(out, B, lambda n: oracle.sce(B[n], [s[n] for s in sds], select_topk=0.3, delta_dtype=torch.float64))


def test_methods_listing_includes_new_methods(capsys):
    from pipelines.cli import main

    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in ("multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
