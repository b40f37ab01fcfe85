"""Every merge method of the engine against an independent float64 oracle (tests/oracle.py).

Why an oracle instead of golden files: the contract (/work/shared/merge-methods.md) is a set of formulas, and a
whole-tensor float64 implementation of those formulas is short enough to check by eye, while the engine streams
row blocks over several passes in float32. Each test builds tiny Llama checkpoints, runs ``merge_ops.api.merge``,
loads every output tensor and compares it with the oracle.

Tolerances (see ``oracle.assert_matches``):
* float32 output: |got − want| ≤ 1e-5·|want| + 1e-5·max|want| per tensor;
* bfloat16 / float16 output: the oracle is rounded to that dtype, and the engine may be 1 ulp away from it (plus
  1e-6·max|want| for cancellation near zero);
* chunked runs (``chunk_elements=64, cache_bytes=0``) of deterministic methods must equal the unchunked run
  bit-for-bit;
* random methods (DARE, DELLA) are checked by seeding, reductions to deterministic methods (density 1) and
  statistics (kept fraction within 6σ, L1 norm preserved to 1e-5).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_ops.api import MergeOptions, merge, plan_merge
from merge_ops.errors import ConfigError
from tests import oracle
from tests.merge_helpers import check_all, models_cfg
from tests.tiny_models import load_state, save_tiny_llama, save_variant

NUM_LAYERS = 4
HIDDEN = 32
VOCAB = 64
DROPPED = ("model.layers.1.mlp.up_proj.weight", "model.norm.weight")
ZEROED = "model.layers.0.self_attn.q_proj.weight"


# -- model zoo -------------------------------------------------------------------------------------------------------
def write_model(template: Path, out: Path, sd: dict[str, torch.Tensor]) -> Path:
    """A model directory with ``template``'s config and the given tensors."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / "config.json", out / "config.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class Zoo:
    """Paths and loaded states of the tiny models used by the tests (built once per module)."""

    def __init__(self, root: Path):
        self.root = root
        kw = dict(num_layers=NUM_LAYERS, hidden=HIDDEN, vocab=VOCAB, tokenizer=False)
        self.base = save_tiny_llama(root / "base", seed=1, **kw)
        self.a = save_variant(self.base, root / "a", seed=11, scale=0.05)
        self.b = save_variant(self.base, root / "b", seed=12, scale=0.10)
        self.c = save_variant(self.base, root / "c", seed=13, scale=0.08)
        self.a_copy = Path(shutil.copytree(self.a, root / "a_copy"))
        self.c_drop = save_variant(self.base, root / "c_drop", seed=13, scale=0.08, drop=DROPPED)
        base_sd = load_state(self.base)
        # parallel (2×base), anti-parallel (−base) and one all-zero tensor: the SLERP edge cases
        par = {k: 2 * v for k, v in base_sd.items()}
        par[ZEROED] = torch.zeros_like(par[ZEROED])
        self.par = write_model(self.base, root / "par", par)
        self.neg = write_model(self.base, root / "neg", {k: -v for k, v in base_sd.items()})
        # tie-heavy float32 models: base on a 2^-16 grid, deltas in {−2,…,2}·2^-10 (exact in float32), so |δ| takes
        # three values and every top-k boundary falls inside a large group of equal magnitudes
        g = torch.Generator().manual_seed(5)
        qbase = {k: torch.round(v * 2**16) / 2**16 for k, v in base_sd.items()}
        self.qbase = write_model(self.base, root / "qbase", qbase)
        self.q = []
        for i in range(2):
            sd = {k: v + torch.randint(-2, 3, v.shape, generator=g).float() * 2**-10 for k, v in qbase.items()}
            self.q.append(write_model(self.base, root / f"q{i}", sd))
        # bfloat16 family (bf16 deltas tie often) and float16 inputs
        self.base16 = save_tiny_llama(root / "base_bf16", seed=1, dtype=torch.bfloat16, **kw)
        self.a16 = save_variant(self.base16, root / "a_bf16", seed=21, scale=0.05)
        self.b16 = save_variant(self.base16, root / "b_bf16", seed=22, scale=0.08)
        self.a_fp16 = save_variant(self.base, root / "a_fp16", seed=31, scale=0.05, dtype=torch.float16)
        self.tied_a = save_tiny_llama(root / "tied_a", seed=2, num_layers=2, hidden=HIDDEN, vocab=VOCAB, tie=True,
                                      tokenizer=False)
        self.tied_b = save_variant(self.tied_a, root / "tied_b", seed=41, scale=0.1)
        self._states: dict[Path, dict[str, torch.Tensor]] = {}

    def sd(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._states:
            self._states[path] = load_state(path)
        return self._states[path]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def out_root(tmp_path) -> Path:
    return tmp_path


_counter = [0]


def run(cfg: dict, out_root: Path, **opts) -> tuple[dict[str, torch.Tensor], Path]:
    _counter[0] += 1
    out = out_root / f"out{_counter[0]}"
    options = MergeOptions(device="cpu", seed=opts.pop("seed", 0), hash_inputs=False, copy_tokenizer=False, **opts)
    merge(cfg, out, options)
    return load_state(out), out


CHUNKED = dict(chunk_elements=64, cache_bytes=0)


def t_of(name: str) -> float:
    return oracle.gradient_t(name, NUM_LAYERS)


def assert_bitwise_equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{k} differs between runs"


# -- parameter helpers (oracle side) ---------------------------------------------------------------------------------
def test_oracle_parameter_resolution():
    """The oracle's own gradient / filter rules (so a wrong oracle cannot silently agree with a wrong engine)."""
    assert oracle.sample_gradient([0.0, 1.0, 3.0], 0.75) == pytest.approx(2.0)
    assert oracle.sample_gradient([0.2, 0.8], 1.0) == pytest.approx(0.8)
    assert oracle.gradient_t("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert oracle.gradient_t("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert oracle.gradient_t("model.embed_tokens.weight", 4) == 0.0
    flt = [{"filter": "mlp", "value": 2.0}, {"filter": "up_proj", "value": 3.0}, {"value": [1.0, 5.0]}]
    assert oracle.resolve(flt, "model.layers.1.mlp.up_proj.weight", 0.5) == 2.0  # first match wins
    assert oracle.resolve(flt, "model.norm.weight", 0.5) == 3.0  # no-filter entry matches all (gradient)
    m = oracle.topk_mask(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2)
    assert m.tolist() == [False, True, True, False, False]  # ties: lowest flat index first
    d = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.25, 0.1, 0.0, 0.0], dtype=torch.float64)
    assert oracle.breadcrumbs_keep(d, 0.3, 0.2).tolist() == [0, 0, 3.0, -2.0, 1.0, 0, 0, 0, 0, 0]
    # ρ + γ > 1: the top cut shrinks to n − k2 = 1
    assert oracle.breadcrumbs_keep(d, 0.9, 0.2).tolist() == [0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.25, 0.1, 0, 0]
    el = oracle.elect([torch.tensor([1.0, -1.0, 0.0]).double(), torch.tensor([-2.0, 0.5, 0.0]).double()])
    assert [e.tolist() for e in el] == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


# -- linear ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(zoo, out_root, normalize):
    ws = [1.0, 0.5, -0.25]
    models = [zoo.a, zoo.b, zoo.c]
    cfg = models_cfg("linear", None, [(m, {"weight": w}) for m, w in zip(models, ws)],
                     parameters={"normalize": normalize})
    out, _ = run(cfg, out_root)
    sds = [zoo.sd(m) for m in models]
    check_all(out, sds[0], lambda n: oracle.linear([s[n] for s in sds], ws, normalize=normalize))


def test_linear_gradient_and_filter_weights(zoo, out_root):
    """Gradient lists across layers, {filter, value} lists (first match wins, no filter matches all) and int values."""
    w_a = [1.0, 0.2, 3.0]
    w_b = [{"filter": "self_attn", "value": 0.5}, {"filter": "q_proj", "value": 100.0},
           {"filter": "mlp", "value": [2.0, 0.5]}, {"value": 1}]
    cfg = models_cfg("linear", None, [(zoo.a, {"weight": w_a}), (zoo.b, {"weight": w_b})])
    out, _ = run(cfg, out_root)
    A, B = zoo.sd(zoo.a), zoo.sd(zoo.b)

    def want(n):
        ws = [oracle.resolve(w_a, n, t_of(n)), oracle.resolve(w_b, n, t_of(n))]
        return oracle.linear([A[n], B[n]], ws)

    check_all(out, A, want)


def test_linear_zero_weight_sum_is_config_error(zoo, out_root):
    cfg = models_cfg("linear", None, [(zoo.a, {"weight": 0.5}), (zoo.b, {"weight": -0.5})])
    with pytest.raises(ConfigError):
        run(cfg, out_root)
    assert not any(out_root.iterdir()), "nothing may be written for an invalid config"
    # without normalize the same weights are fine
    cfg["parameters"] = {"normalize": False}
    out, _ = run(cfg, out_root)
    A, B = zoo.sd(zoo.a), zoo.sd(zoo.b)
    check_all(out, A, lambda n: oracle.linear([A[n], B[n]], [0.5, -0.5], normalize=False))


def test_linear_gradient_weights_summing_to_zero_on_one_layer(zoo, out_root):
    """w_a = [1, −1], w_b = [0, 0.5]: the sum 1 − 1.5·t is 0 at layer 2 of 4 (t = 2/3) -> an error, never NaN."""
    cfg = models_cfg("linear", None, [(zoo.a, {"weight": [1.0, -1.0]}), (zoo.b, {"weight": [0.0, 0.5]})])
    with pytest.raises(ConfigError, match="layers.2"):
        run(cfg, out_root)
    assert not any(out_root.iterdir())


def test_linear_tied_embeddings(zoo, out_root):
    """Tied-embedding models have no lm_head tensor; the output keeps exactly the inputs' tensors and tie flag."""
    A, Bt = zoo.sd(zoo.tied_a), zoo.sd(zoo.tied_b)
    assert "lm_head.weight" not in A
    out, out_dir = run(models_cfg("linear", None, [(zoo.tied_a, {"weight": 0.25}), (zoo.tied_b, {"weight": 0.75})]),
                       out_root)
    check_all(out, A, lambda n: oracle.linear([A[n], Bt[n]], [0.25, 0.75]))
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is True


# -- task arithmetic -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(zoo, out_root, normalize):
    ws = [0.7, -0.4, 1.2]
    models = [zoo.a, zoo.b, zoo.c]
    cfg = models_cfg("task_arithmetic", zoo.base, [(m, {"weight": w}) for m, w in zip(models, ws)],
                     parameters={"lambda": 0.8, "normalize": normalize})
    out, _ = run(cfg, out_root)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]
    check_all(out, B, lambda n: oracle.task_arithmetic(B[n], [s[n] for s in sds], ws, lam=0.8, normalize=normalize))


# -- TIES ------------------------------------------------------------------------------------------------------------
TIES_CASES = {
    "default-normalize": ({"lambda": 1.0}, [1.0, 0.6, 0.8], [0.5, 0.3, 0.9], True, 1.0),
    "no-normalize-lambda": ({"lambda": 1.5, "normalize": False}, [1.0, 0.6, 0.8], [0.5, 0.3, 0.9], False, 1.5),
    "negative-weight": ({}, [1.0, -0.6, 0.8], [0.7, 0.4, 0.2], True, 1.0),
    "density-0": ({}, [1.0, 0.6, 0.8], [0.0, 0.0, 0.0], True, 1.0),
    "density-1": ({}, [1.0, 0.6, 0.8], [1.0, 1.0, 1.0], True, 1.0),
}


@pytest.mark.parametrize("case", list(TIES_CASES))
def test_ties(zoo, out_root, case):
    glob, ws, rhos, normalize, lam = TIES_CASES[case]
    models = [zoo.a, zoo.b, zoo.c]
    cfg = models_cfg("ties", zoo.base, [(m, {"weight": w, "density": r}) for m, w, r in zip(models, ws, rhos)],
                     parameters=glob)
    out, _ = run(cfg, out_root)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]
    check_all(out, B, lambda n: oracle.ties(B[n], [s[n] for s in sds], ws, rhos, lam=lam, normalize=normalize))
    if case == "density-0":
        assert_bitwise_equal(out, B)


def test_ties_parameter_precedence(zoo, out_root):
    """Per-model density > global density; global weight gradient applies where a model gives none."""
    cfg = models_cfg("ties", zoo.base, [(zoo.a, {"density": 0.2}), (zoo.b, {})],
                     parameters={"density": 0.6, "weight": [0.5, 1.5]})
    out, _ = run(cfg, out_root)
    B, A, Bm = zoo.sd(zoo.base), zoo.sd(zoo.a), zoo.sd(zoo.b)

    def want(n):
        w = oracle.resolve([0.5, 1.5], n, t_of(n))
        return oracle.ties(B[n], [A[n], Bm[n]], [w, w], [0.2, 0.6])

    check_all(out, B, want)


@pytest.mark.parametrize("density", [0.3, 0.55, 0.8])
def test_ties_tie_rule_on_equal_magnitudes(zoo, out_root, density):
    """|δ| ∈ {0, 2^-10, 2^-9}: exactly k = int(ρ·n) kept, equal magnitudes by lowest flat index."""
    cfg = models_cfg("ties", zoo.qbase, [(zoo.q[0], {"weight": 1.0, "density": density}),
                                         (zoo.q[1], {"weight": 0.5, "density": density})],
                     parameters={"normalize": False})
    out, _ = run(cfg, out_root)
    B, Q0, Q1 = zoo.sd(zoo.qbase), zoo.sd(zoo.q[0]), zoo.sd(zoo.q[1])
    check_all(out, B, lambda n: oracle.ties(B[n], [Q0[n], Q1[n]], [1.0, 0.5], [density] * 2, normalize=False))
    # single model, weight 1: output − base is exactly the sparsified delta; count the kept entries
    cfg1 = models_cfg("ties", zoo.qbase, [(zoo.q[0], {"weight": 1.0, "density": density})])
    out1, _ = run(cfg1, out_root)
    for n, v in out1.items():
        kept = int(((v - B[n]) != 0).sum())
        nz = int(((Q0[n] - B[n]) != 0).sum())
        assert kept == min(int(density * v.numel()), nz), n


def test_ties_bf16_inputs(zoo, out_root):
    """bf16 deltas tie often; output bf16 within 1 ulp of the rounded oracle."""
    cfg = models_cfg("ties", zoo.base16, [(zoo.a16, {"weight": 0.7, "density": 0.4}),
                                          (zoo.b16, {"weight": 0.5, "density": 0.6})])
    out, _ = run(cfg, out_root)
    B, A, Bm = zoo.sd(zoo.base16), zoo.sd(zoo.a16), zoo.sd(zoo.b16)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    check_all(out, B, lambda n: oracle.ties(B[n], [A[n], Bm[n]], [0.7, 0.5], [0.4, 0.6]))


def test_ties_float64_compute(zoo, out_root):
    """compute_dtype float64: float32 output within 1 ulp of the float64 oracle rounded to float32."""
    cfg = models_cfg("ties", zoo.base, [(zoo.a, {"weight": 0.7, "density": 0.4}),
                                        (zoo.b, {"weight": 0.5, "density": 0.6})], parameters={"lambda": 1.3})
    out, _ = run(cfg, out_root, compute_dtype="float64")
    B, A, Bm = zoo.sd(zoo.base), zoo.sd(zoo.a), zoo.sd(zoo.b)

    def want(n):
        return oracle.ties(B[n], [A[n], Bm[n]], [0.7, 0.5], [0.4, 0.6], lam=1.3, delta_dtype=torch.float64)

    for n in B:
        ref = want(n).float()
        ulp = (torch.nextafter(ref.abs(), torch.tensor(float("inf"))) - ref.abs())
        assert ((out[n] - ref).abs() <= ulp).all(), n


# -- breadcrumbs -----------------------------------------------------------------------------------------------------
BREAD_CASES = {
    # (method, global params, densities, gamma used by the oracle, normalize, elected)
    "plain": ("breadcrumbs", {"gamma": 0.05}, [0.5, 0.3], 0.05, False, False),
    "default-gamma": ("breadcrumbs", {}, [0.5, 0.3], 0.01, False, False),  # γ·n rounds to 0 on 1-D tensors
    "overlap-shrinks-top-cut": ("breadcrumbs", {"gamma": 0.1}, [0.95, 1.0], 0.1, False, False),
    "ties": ("breadcrumbs_ties", {"gamma": 0.05, "lambda": 1.2}, [0.6, 0.4], 0.05, False, True),
    "ties-normalize": ("breadcrumbs_ties", {"gamma": 0.02, "normalize": True}, [0.6, 0.4], 0.02, True, True),
    "density-0": ("breadcrumbs_ties", {"gamma": 0.05}, [0.0, 0.0], 0.05, False, True),
}


@pytest.mark.parametrize("case", list(BREAD_CASES))
def test_breadcrumbs(zoo, out_root, case):
    method, glob, rhos, gamma, normalize, elected = BREAD_CASES[case]
    lam = glob.get("lambda", 1.0)
    ws = [0.8, 0.6]
    models = [zoo.a, zoo.b]
    cfg = models_cfg(method, zoo.base, [(m, {"weight": w, "density": r}) for m, w, r in zip(models, ws, rhos)],
                     parameters=glob)
    out, _ = run(cfg, out_root)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]
    check_all(out, B, lambda n: oracle.breadcrumbs(B[n], [s[n] for s in sds], ws, rhos, gamma=gamma, lam=lam,
                                                   normalize=normalize, elected=elected))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_tie_rule_on_equal_magnitudes(zoo, out_root, method):
    cfg = models_cfg(method, zoo.qbase, [(zoo.q[0], {"weight": 1.0, "density": 0.45}),
                                         (zoo.q[1], {"weight": 0.7, "density": 0.3})], parameters={"gamma": 0.15})
    out, _ = run(cfg, out_root)
    B, Q0, Q1 = zoo.sd(zoo.qbase), zoo.sd(zoo.q[0]), zoo.sd(zoo.q[1])
    check_all(out, B, lambda n: oracle.breadcrumbs(B[n], [Q0[n], Q1[n]], [1.0, 0.7], [0.45, 0.3], gamma=0.15,
                                                   elected=method == "breadcrumbs_ties"))


# -- DARE ------------------------------------------------------------------------------------------------------------
RESCALE_MODES = ["default-l1", "l1", "inverse_density"]


def _rescale_params(mode: str) -> dict:
    return {} if mode == "default-l1" else {"rescale_mode": mode}


def test_rescale_mode_is_a_valid_parameter(zoo, out_root):
    """The spec asks for the paper's 1/ρ rescale as an explicit option: both choices plan, anything else is a
    ConfigError before any tensor is read."""
    def cfg(mode):
        return models_cfg("dare_linear", zoo.base, [(zoo.a, {"weight": 1.0, "density": 0.5})],
                          parameters={"rescale_mode": mode})

    for mode in ("l1", "inverse_density"):
        plan_merge(cfg(mode), MergeOptions(device="cpu"))
    with pytest.raises(ConfigError):
        run(cfg("l2"), out_root)
    assert not any(out_root.iterdir())


@pytest.mark.parametrize("rescale_mode", RESCALE_MODES)
def test_dare_density_one_is_deterministic_method(zoo, out_root, rescale_mode):
    ws = [0.7, -0.4, 1.2]
    models = [zoo.a, zoo.b, zoo.c]
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]
    entries = [(m, {"weight": w, "density": 1.0}) for m, w in zip(models, ws)]
    glob = {"lambda": 0.9, **_rescale_params(rescale_mode)}
    out, _ = run(models_cfg("dare_linear", zoo.base, entries, parameters=glob), out_root)
    check_all(out, B, lambda n: oracle.task_arithmetic(B[n], [s[n] for s in sds], ws, lam=0.9))
    for normalize in (False, True):
        out, _ = run(models_cfg("dare_ties", zoo.base, entries, parameters={**glob, "normalize": normalize}),
                     out_root)
        check_all(out, B, lambda n: oracle.ties(B[n], [s[n] for s in sds], ws, [1.0] * 3, lam=0.9,
                                                normalize=normalize))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_zero_is_base(zoo, out_root, method):
    cfg = models_cfg(method, zoo.base, [(zoo.a, {"weight": 1.0, "density": 0.0}),
                                        (zoo.b, {"weight": 0.5, "density": 0.0})])
    out, _ = run(cfg, out_root)
    assert_bitwise_equal(out, zoo.sd(zoo.base))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_seeded(zoo, out_root, method):
    extra = {"epsilon": 0.1, "normalize": False} if method.startswith("della") else {"normalize": False}
    cfg = models_cfg(method, zoo.base, [(zoo.a, {"weight": 1.0, "density": 0.5}),
                                        (zoo.b, {"weight": 0.5, "density": 0.4})], parameters=extra)
    x0, _ = run(cfg, out_root, seed=0)
    y0, _ = run(cfg, out_root, seed=0)
    x1, _ = run(cfg, out_root, seed=1)
    assert_bitwise_equal(x0, y0)
    differing = [n for n in x0 if not torch.equal(x0[n], x1[n])]
    assert len(differing) == len(x0), f"seed 1 gave the same output as seed 0 for {sorted(set(x0) - set(differing))}"
    # chunked: same seed -> same output
    c0, _ = run(cfg, out_root, seed=0, **CHUNKED)
    c1, _ = run(cfg, out_root, seed=0, **CHUNKED)
    assert_bitwise_equal(c0, c1)
    # two copies of one model: their masks must be independent draws, so out − base = (s₁m₁ + s₂m₂)·δ takes the
    # value "one copy kept" somewhere (identical masks would give only 0 or both); normalize is off so "both kept"
    # reads ≈ 2·scale and "one kept" ≈ scale (scale ≈ 1/ρ = 2)
    cfg2 = models_cfg(method, zoo.base, [(zoo.a, {"weight": 1.0, "density": 0.5}),
                                         (zoo.a_copy, {"weight": 1.0, "density": 0.5})], parameters=extra)
    out, _ = run(cfg2, out_root, seed=0)
    B, A = zoo.sd(zoo.base), zoo.sd(zoo.a)
    n = "model.layers.2.mlp.gate_proj.weight"
    ratio = (out[n].double() - B[n].double()) / (A[n].double() - B[n].double())
    assert ((ratio > 0.3) & (ratio < 3)).any() and ((ratio.abs() < 1e-3)).any() and (ratio > 3).any()


def _sparsified_delta(out, B, A):
    """{name: (got, d)}: output − base of a single-model merge, and the original delta δ (float32-formed), float64."""
    return {n: ((out[n].double() - B[n].double()), (A[n].float() - B[n].float()).double()) for n in B}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale_mode", RESCALE_MODES)
def test_dare_sparsify_and_rescale(zoo, out_root, method, rescale_mode):
    density = 0.3
    cfg = models_cfg(method, zoo.base, [(zoo.a, {"weight": 1.0, "density": density})],
                     parameters={"lambda": 1.0, **_rescale_params(rescale_mode)})
    out, _ = run(cfg, out_root, seed=3)
    B, A = zoo.sd(zoo.base), zoo.sd(zoo.a)
    kept_total = n_total = 0
    for n, (got, d) in _sparsified_delta(out, B, A).items():
        kept = out[n] != B[n]
        k, m = int(kept.sum()), d.numel()
        kept_total += k
        n_total += m
        assert k > 0 or m < 64, n
        # each kept entry is the original delta times one per-tensor factor; dropped entries are exactly base
        if rescale_mode == "inverse_density":
            scale = 1 / density
        else:
            scale = float(d.abs().sum() / d[kept].abs().sum())
            # L1 norm preserved
            assert float(got.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5), n
        tol = 1e-6 * B[n].double().abs() + 1e-5 * (d * scale).abs() + 1e-9
        assert ((got - d * scale * kept).abs() <= tol).all(), n
        if m >= 2048:  # per-tensor kept fraction within 6σ
            assert abs(k / m - density) <= 6 * math.sqrt(density * (1 - density) / m), (n, k / m)
    assert abs(kept_total / n_total - density) <= 6 * math.sqrt(density * (1 - density) / n_total)


# -- DELLA -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_statistics(zoo, out_root, method):
    """Keep probability per row rises from ρ−ε to ρ+ε with |δ| rank; L1 norm preserved; kept = δ·one factor."""
    density, eps = 0.5, 0.3
    cfg = models_cfg(method, zoo.base, [(zoo.b, {"weight": 1.0, "density": density})],
                     parameters={"epsilon": eps})
    out, _ = run(cfg, out_root, seed=7)
    B, A = zoo.sd(zoo.base), zoo.sd(zoo.b)
    low_kept = low_n = high_kept = high_n = 0
    exp_low = exp_high = 0.0
    var = 0.0
    for n, (got, d) in _sparsified_delta(out, B, A).items():
        kept = out[n] != B[n]
        assert float(got.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5), n
        scale = float(d.abs().sum() / d[kept].abs().sum())
        tol = 1e-6 * B[n].double().abs() + 1e-5 * (d * scale).abs() + 1e-9
        assert ((got - d * scale * kept).abs() <= tol).all(), n
        p = oracle.della_keep_probability(d, density, eps)
        lo = p < density
        low_kept += int((kept & lo).sum())
        high_kept += int((kept & ~lo).sum())
        low_n += int(lo.sum())
        high_n += int((~lo).sum())
        exp_low += float(p[lo].sum())
        exp_high += float(p[~lo].sum())
        var += float((p * (1 - p)).sum())
    sd = math.sqrt(var)
    assert abs(low_kept - exp_low) <= 6 * sd, (low_kept, exp_low)
    assert abs(high_kept - exp_high) <= 6 * sd, (high_kept, exp_high)
    assert high_kept / high_n - low_kept / low_n > 0.2  # expected ≈ ε = 0.3


def test_della_two_models_uses_election(zoo, out_root):
    """With ε → tiny and ρ → 1 DELLA keeps nearly everything, so it must be close to TIES(ρ=1) and far from
    della_linear where signs disagree."""
    entries = [(zoo.a, {"weight": 1.0, "density": 0.999}), (zoo.b, {"weight": 0.8, "density": 0.999})]
    out, _ = run(models_cfg("della", zoo.base, entries, parameters={"epsilon": 0.0005}), out_root)
    lin, _ = run(models_cfg("della_linear", zoo.base, entries, parameters={"epsilon": 0.0005}), out_root)
    B, A, Bm = zoo.sd(zoo.base), zoo.sd(zoo.a), zoo.sd(zoo.b)
    n = "model.layers.1.mlp.down_proj.weight"
    t = oracle.ties(B[n], [A[n], Bm[n]], [1.0, 0.8], [1.0, 1.0])
    ta = oracle.task_arithmetic(B[n], [A[n], Bm[n]], [1.0, 0.8])
    # about 0.1% of entries dropped per model (the rest rescaled by ~1.001): mean error ≪ mean update
    assert float((out[n].double() - t).abs().mean()) < 1e-2 * float((t - B[n].double()).abs().mean())
    assert float((lin[n].double() - ta).abs().mean()) < 1e-2 * float((ta - B[n].double()).abs().mean())
    assert float((t - ta).abs().mean()) > 0.1 * float((ta - B[n].double()).abs().mean())


@pytest.mark.parametrize("density,eps", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_probability_range_is_config_error(zoo, out_root, density, eps):
    cfg = models_cfg("della", zoo.base, [(zoo.a, {"weight": 1.0, "density": density})], parameters={"epsilon": eps})
    with pytest.raises(ConfigError):
        run(cfg, out_root)


# -- SLERP -----------------------------------------------------------------------------------------------------------
SLERP_T = {
    "scalar": 0.3,
    "gradient": [0.0, 0.5, 1.0],
    "filtered": [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.6}],
}


@pytest.mark.parametrize("case", list(SLERP_T))
def test_slerp(zoo, out_root, case):
    t = SLERP_T[case]
    cfg = models_cfg("slerp", zoo.base, [(zoo.base, {}), (zoo.b, {})], parameters={"t": t})
    out, _ = run(cfg, out_root)
    B, Bm = zoo.sd(zoo.base), zoo.sd(zoo.b)
    check_all(out, B, lambda n: oracle.slerp(oracle.resolve(t, n, t_of(n)), B[n], Bm[n]))


def test_slerp_parallel_antiparallel_and_zero(zoo, out_root):
    """θ_1 = 2θ_b (|cos| = 1) -> plain lerp, exactly (1 + t)·θ_b, never NaN; θ_1 = −θ_b -> (1 − 2t)·θ_b; a zero
    tensor (norm ≤ 1e-8, left unnormalized: cos = 0, θ = π/2) -> cos(tπ/2)·θ_b."""
    t = 0.3
    B = zoo.sd(zoo.base)
    out, _ = run(models_cfg("slerp", zoo.base, [(zoo.base, {}), (zoo.par, {})], parameters={"t": t}), out_root)
    P = zoo.sd(zoo.par)
    check_all(out, B, lambda n: oracle.slerp(t, B[n], P[n]))
    n = "model.layers.1.mlp.up_proj.weight"
    oracle.assert_matches(out[n], 1.3 * B[n].double(), n)
    oracle.assert_matches(out[ZEROED], math.cos(t * math.pi / 2) * B[ZEROED].double(), ZEROED)
    out, _ = run(models_cfg("slerp", zoo.base, [(zoo.base, {}), (zoo.neg, {})], parameters={"t": t}), out_root)
    check_all(out, B, lambda n: (1 - 2 * t) * B[n].double())


def test_slerp_needs_exactly_two_models(zoo, out_root):
    cfg = models_cfg("slerp", zoo.base, [(zoo.base, {}), (zoo.a, {}), (zoo.b, {})], parameters={"t": 0.5})
    with pytest.raises(ConfigError):
        run(cfg, out_root)


# -- NuSLERP ---------------------------------------------------------------------------------------------------------
NUSLERP_CASES = {
    "with-base": (True, {}),
    "no-base": (False, {}),
    "zero-sum-weights": (True, {}),
    "with-base-rows": (True, {"nuslerp_flatten": False}),
    "no-base-row-wise": (False, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
}
NUSLERP_WEIGHTS = {"zero-sum-weights": [0.5, -0.5]}  # t = 0.5 when w1 + w2 ~ 0
@pytest.mark.parametrize("case", list(NUSLERP_CASES))
def test_nuslerp(zoo, out_root, case):
    with_base, glob = NUSLERP_CASES[case]
    ws = NUSLERP_WEIGHTS.get(case, [0.3, 0.9])
    cfg = models_cfg("nuslerp", zoo.base if with_base else None,
                     [(zoo.a, {"weight": ws[0]}), (zoo.b, {"weight": ws[1]})], parameters=glob)
    out, _ = run(cfg, out_root)
    B, A, Bm = zoo.sd(zoo.base), zoo.sd(zoo.a), zoo.sd(zoo.b)
    flatten = glob.get("nuslerp_flatten", True)
    row_wise = glob.get("nuslerp_row_wise", False)
    check_all(out, B, lambda n: oracle.nuslerp([A[n], Bm[n]], ws, B[n] if with_base else None,
                                               flatten=flatten, row_wise=row_wise))


# -- Model Stock -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(zoo, out_root, filter_wise, n_models):
    models = [zoo.a, zoo.b, zoo.c][:n_models]
    cfg = models_cfg("model_stock", zoo.base, [(m, {}) for m in models], parameters={"filter_wise": filter_wise})
    out, _ = run(cfg, out_root)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]
    check_all(out, B, lambda n: oracle.model_stock(B[n], [s[n] for s in sds], filter_wise=filter_wise))


# -- passthrough and slices ------------------------------------------------------------------------------------------
def test_passthrough_scale(zoo, out_root):
    scale = [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]
    out, _ = run({"merge_method": "passthrough", "models": [{"model": str(zoo.a)}], "parameters": {"scale": scale}},
                 out_root)
    A = zoo.sd(zoo.a)
    check_all(out, A, lambda n: oracle.passthrough(A[n], oracle.resolve(scale, n, 0.0)))
    out, _ = run({"merge_method": "passthrough", "models": [{"model": str(zoo.a)}]}, out_root)
    assert_bitwise_equal(out, A)


def test_passthrough_slices_layer_stacking(zoo, out_root):
    """[0, 2) of A then [1, 2) of B -> 3 layers; every layer tensor copied bit-for-bit from its source layer.

    Non-layer tensors follow MergeKit: embeddings from the first slice's model, final norm and lm_head from the last.
    """
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(zoo.a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(zoo.b), "layer_range": [1, 2]}]},
    ]}
    out, out_dir = run(cfg, out_root)
    A, Bm = zoo.sd(zoo.a), zoo.sd(zoo.b)
    conf = json.loads((out_dir / "config.json").read_text())
    assert conf["num_hidden_layers"] == 3
    mapping = {0: (A, 0), 1: (A, 1), 2: (Bm, 1)}
    want = {}
    for n in A:
        i = oracle.layer_index(n)
        if i is None:
            continue
        if i < 3:
            sd, j = mapping[i]
            want[n] = sd[n.replace(f".layers.{i}.", f".layers.{j}.")]
    want["model.embed_tokens.weight"] = A["model.embed_tokens.weight"]
    want["model.norm.weight"] = Bm["model.norm.weight"]
    want["lm_head.weight"] = Bm["lm_head.weight"]
    assert sorted(out) == sorted(want)
    for n, v in want.items():
        assert torch.equal(out[n], v), n
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)


def test_slerp_slices_per_slice_gradient(zoo, out_root):
    """Three slices [0,1), [1,3), [3,4) of base/B; global t = [0.1, 0.9], slice 2 overrides t = [0.3, 0.7].

    t within a slice is layer/(L−1) (1 when L = 1): layer 0 -> 0.9, layers 1, 2 -> 0.3, 0.7, layer 3 -> 0.9;
    non-layer tensors take the first value of the global gradient (0.1).
    """
    def src(lo, hi):
        return [{"model": str(zoo.base), "layer_range": [lo, hi]}, {"model": str(zoo.b), "layer_range": [lo, hi]}]

    cfg = {"merge_method": "slerp", "base_model": str(zoo.base), "parameters": {"t": [0.1, 0.9]},
           "slices": [{"sources": src(0, 1)}, {"sources": src(1, 3), "parameters": {"t": [0.3, 0.7]}},
                      {"sources": src(3, 4)}]}
    out, out_dir = run(cfg, out_root)
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 4
    B, Bm = zoo.sd(zoo.base), zoo.sd(zoo.b)
    t_layer = {0: 0.9, 1: 0.3, 2: 0.7, 3: 0.9}

    def want(n):
        i = oracle.layer_index(n)
        return oracle.slerp(0.1 if i is None else t_layer[i], B[n], Bm[n])

    check_all(out, B, want)


# -- missing tensors, dtypes -----------------------------------------------------------------------------------------
def test_tensor_missing_in_some_models(zoo, out_root):
    """A tensor absent from one model is merged over the models that have it."""
    ws = [0.5, 0.3, 0.2]
    models = [zoo.a, zoo.b, zoo.c_drop]
    sds = [zoo.sd(m) for m in models]
    A = sds[0]

    def have(n):
        return [(s[n], w) for s, w in zip(sds, ws) if n in s]

    out, _ = run(models_cfg("linear", None, [(m, {"weight": w}) for m, w in zip(models, ws)]), out_root)
    check_all(out, A, lambda n: oracle.linear([x for x, _ in have(n)], [w for _, w in have(n)]))
    B = zoo.sd(zoo.base)
    rhos = {0.5: 0.5, 0.3: 0.7, 0.2: 0.4}
    cfg = models_cfg("ties", zoo.base, [(m, {"weight": w, "density": rhos[w]}) for m, w in zip(models, ws)])
    out, _ = run(cfg, out_root)
    check_all(out, B, lambda n: oracle.ties(B[n], [x for x, _ in have(n)], [w for _, w in have(n)],
                                            [rhos[w] for _, w in have(n)]))
    for n in DROPPED:
        assert len(have(n)) == 2


def test_mixed_input_dtypes_output_follows_base(zoo, out_root):
    """fp32 base, fp16 and fp32 models: output dtype is the base's (float32), math in float32+."""
    models = [zoo.a_fp16, zoo.b]
    ws = [0.6, 0.4]
    out, _ = run(models_cfg("task_arithmetic", zoo.base, [(m, {"weight": w}) for m, w in zip(models, ws)]), out_root)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]
    assert sds[0]["model.norm.weight"].dtype == torch.float16
    assert all(v.dtype == torch.float32 for v in out.values())
    check_all(out, B, lambda n: oracle.task_arithmetic(B[n], [s[n] for s in sds], ws))


@pytest.mark.parametrize("dtype,out_dtype,want_dtype", [
    ("float16", None, torch.float16),
    ("float32", "bfloat16", torch.bfloat16),
    (None, "float16", torch.float16),
])
def test_dtype_and_out_dtype(zoo, out_root, dtype, out_dtype, want_dtype):
    """Results are cast to out_dtype, else dtype, else the base's dtype, only at the end."""
    models = [zoo.a, zoo.b]
    ws = [0.6, 0.4]
    top = {k: v for k, v in (("dtype", dtype), ("out_dtype", out_dtype)) if v}
    out, _ = run(models_cfg("ties", zoo.base, [(m, {"weight": w, "density": 0.5}) for m, w in zip(models, ws)],
                            **top), out_root)
    B, sds = zoo.sd(zoo.base), [zoo.sd(m) for m in models]
    assert {v.dtype for v in out.values()} == {want_dtype}
    check_all(out, B, lambda n: oracle.ties(B[n], [s[n] for s in sds], ws, [0.5, 0.5]))


def test_bf16_linear_and_slerp(zoo, out_root):
    B, A, Bm = zoo.sd(zoo.base16), zoo.sd(zoo.a16), zoo.sd(zoo.b16)
    out, _ = run(models_cfg("linear", None, [(zoo.a16, {"weight": 0.7}), (zoo.b16, {"weight": 0.6})]), out_root)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    check_all(out, B, lambda n: oracle.linear([A[n], Bm[n]], [0.7, 0.6]))
    out, _ = run(models_cfg("slerp", zoo.base16, [(zoo.base16, {}), (zoo.a16, {})], parameters={"t": 0.4}), out_root)
    check_all(out, B, lambda n: oracle.slerp(0.4, B[n], A[n]))


# -- chunked execution -----------------------------------------------------------------------------------------------
def _chunk_cases(z: Zoo):
    three = [(z.a, {"weight": 0.7, "density": 0.4}), (z.b, {"weight": 0.5, "density": 0.6}),
             (z.c, {"weight": 0.3, "density": 0.3})]
    three_w = [(m, {"weight": p["weight"]}) for m, p in three]
    B, A, Bm, C = z.sd(z.base), z.sd(z.a), z.sd(z.b), z.sd(z.c)
    QB, Q0, Q1 = z.sd(z.qbase), z.sd(z.q[0]), z.sd(z.q[1])
    B16, A16, Bm16 = z.sd(z.base16), z.sd(z.a16), z.sd(z.b16)
    W, R = [0.7, 0.5, 0.3], [0.4, 0.6, 0.3]

    def xs(n):
        return [A[n], Bm[n], C[n]]

    return {
        "linear": (models_cfg("linear", None, three_w), lambda n: oracle.linear(xs(n), W)),
        "task_arithmetic": (models_cfg("task_arithmetic", z.base, three_w, parameters={"lambda": 0.9}),
                            lambda n: oracle.task_arithmetic(B[n], xs(n), W, lam=0.9)),
        "ties": (models_cfg("ties", z.base, three), lambda n: oracle.ties(B[n], xs(n), W, R)),
        "breadcrumbs_ties": (models_cfg("breadcrumbs_ties", z.base, three, parameters={"gamma": 0.05}),
                             lambda n: oracle.breadcrumbs(B[n], xs(n), W, R, gamma=0.05, elected=True)),
        "slerp": (models_cfg("slerp", z.base, [(z.base, {}), (z.b, {})], parameters={"t": [0.2, 0.8]}),
                  lambda n: oracle.slerp(oracle.sample_gradient([0.2, 0.8], t_of(n)), B[n], Bm[n])),
        "nuslerp": (models_cfg("nuslerp", z.base, [(z.a, {"weight": 0.4}), (z.b, {"weight": 0.6})]),
                    lambda n: oracle.nuslerp([A[n], Bm[n]], [0.4, 0.6], B[n])),
        # per-vector NuSLERP: bit-for-bit chunking only (its axis convention is checked in test_nuslerp)
        "nuslerp-per-vector": (models_cfg("nuslerp", None, [(z.a, {"weight": 0.4}), (z.b, {"weight": 0.6})],
                                          parameters={"nuslerp_flatten": False}), None),
        "nuslerp-per-vector-row_wise": (models_cfg("nuslerp", None, [(z.a, {"weight": 0.4}), (z.b, {"weight": 0.6})],
                                                   parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
                                        None),
        "model_stock": (models_cfg("model_stock", z.base, [(z.a, {}), (z.b, {}), (z.c, {})]),
                        lambda n: oracle.model_stock(B[n], xs(n))),
        "model_stock-filter_wise": (models_cfg("model_stock", z.base, [(z.a, {}), (z.b, {}), (z.c, {})],
                                               parameters={"filter_wise": True}),
                                    lambda n: oracle.model_stock(B[n], xs(n), filter_wise=True)),
        "dare_ties-density-1": (models_cfg("dare_ties", z.base, [(m, {**p, "density": 1.0}) for m, p in three]),
                                lambda n: oracle.ties(B[n], xs(n), W, [1.0] * 3, normalize=False)),
        # top-k with many equal magnitudes across row blocks, and bf16 deltas
        "ties-equal-magnitudes": (
            models_cfg("ties", z.qbase, [(z.q[0], {"weight": 1.0, "density": 0.55}),
                                         (z.q[1], {"weight": 0.5, "density": 0.3})]),
            lambda n: oracle.ties(QB[n], [Q0[n], Q1[n]], [1.0, 0.5], [0.55, 0.3])),
        "breadcrumbs-equal-magnitudes": (
            models_cfg("breadcrumbs", z.qbase, [(z.q[0], {"weight": 1.0, "density": 0.45}),
                                                (z.q[1], {"weight": 0.5, "density": 0.3})],
                       parameters={"gamma": 0.15}),
            lambda n: oracle.breadcrumbs(QB[n], [Q0[n], Q1[n]], [1.0, 0.5], [0.45, 0.3], gamma=0.15)),
        "ties-bf16": (models_cfg("ties", z.base16, [(z.a16, {"weight": 0.7, "density": 0.4}),
                                                   (z.b16, {"weight": 0.5, "density": 0.6})]),
                      lambda n: oracle.ties(B16[n], [A16[n], Bm16[n]], [0.7, 0.5], [0.4, 0.6])),
        "passthrough": ({"merge_method": "passthrough", "models": [{"model": str(z.a)}],
                         "parameters": {"scale": 0.5}}, lambda n: 0.5 * A[n].double()),
    }


CHUNK_CASE_NAMES = ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "slerp", "nuslerp", "nuslerp-per-vector",
                    "nuslerp-per-vector-row_wise",
                    "model_stock", "model_stock-filter_wise", "dare_ties-density-1", "ties-equal-magnitudes",
                    "breadcrumbs-equal-magnitudes", "ties-bf16", "passthrough"]


@pytest.mark.parametrize("case", CHUNK_CASE_NAMES)
def test_chunked_equals_unchunked_and_oracle(zoo, out_root, case):
    cfg, want = _chunk_cases(zoo)[case]
    full, _ = run(cfg, out_root)
    chunked, _ = run(cfg, out_root, **CHUNKED)
    assert_bitwise_equal(chunked, full)
    if want is not None:
        check_all(chunked, full, want)
