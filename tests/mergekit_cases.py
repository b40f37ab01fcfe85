"""MergeKit configs whose outputs (made by MergeKit 0.1.5 itself) are stored in ``tests/data/mergekit_golden``.

Each case: a name, which input family (``bf16`` or ``f32``, see :mod:`tests.parity_models`), a MergeKit YAML config
as a dict with ``{base}``/``{ft1}``/``{ft2}``/``{ft3}``/``{lora}`` placeholders, and what agreement we promise:

* ``"bitwise"`` — every output tensor byte-identical to MergeKit's;
* ``{"atol": x, "frac": f}`` — max |ours − MergeKit| ≤ x and at most a fraction f of entries differ at all. Used
  where the arithmetic order cannot be the same: SLERP/NuSLERP/model stock need whole-tensor norms and dot
  products, which mergeline streams (and sums in float64) while MergeKit reduces with torch in float32, so the
  coefficients differ in the last bits and some outputs by one float32 ulp (or, rarely, one bf16 ulp);
  and TIES on bf16 deltas, where MergeKit keeps every delta tied with the k-th largest and mergeline keeps exactly
  k (a documented **differs**); and ``arcee_fusion``, whose threshold test sits on torch's vectorised exp/log (their
  last bit depends on the CPU's SIMD level, so MergeKit's own output does too).

Random methods (DARE, DELLA) draw masks from different generators, so only their deterministic limits (density 1)
are compared here; their distributions are tested elsewhere.
"""

from __future__ import annotations

F32_BF16 = {"dtype": "float32", "out_dtype": "bfloat16"}

CASES: list[dict] = [
    # --- linear --------------------------------------------------------------------------------------------------
    {"name": "linear", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "linear", **F32_BF16,
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.5}},
                   {"model": "{ft2}", "parameters": {"weight": 0.3}},
                   {"model": "{ft3}", "parameters": {"weight": 0.2}}]}},
    {"name": "linear_gradient_filter_nonorm", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "linear", **F32_BF16, "parameters": {"normalize": False},
        "models": [{"model": "{ft1}", "parameters": {"weight": [{"filter": "self_attn", "value": [1.0, 0.0]},
                                                                {"filter": "mlp", "value": 0.25},
                                                                {"value": 0.6}]}},
                   {"model": "{ft2}", "parameters": {"weight": [0.2, 0.8, 0.5]}}]}},
    {"name": "linear_f32", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": "{ft1}", "parameters": {"weight": 1.0}},
                   {"model": "{ft2}", "parameters": {"weight": 2.0}},
                   {"model": "{ft3}", "parameters": {"weight": -0.5}}]}},
    {"name": "linear_dtype_f32_out", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.25}},
                   {"model": "{ft2}", "parameters": {"weight": 0.75}}]}},
    {"name": "linear_lora_reference", "family": "f32", "expect": {"atol": 1e-6}, "config": {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": "{base}+{lora}", "parameters": {"weight": 0.5}},
                   {"model": "{ft1}", "parameters": {"weight": 0.5}}]}},
    {"name": "task_arithmetic_lora_bf16", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "task_arithmetic", "base_model": "{base}", **F32_BF16,
        "models": [{"model": "{base}+{lora}", "parameters": {"weight": 1.0}},
                   {"model": "{ft2}", "parameters": {"weight": 0.5}}]}},
    # --- task arithmetic -----------------------------------------------------------------------------------------
    {"name": "task_arithmetic", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "task_arithmetic", "base_model": "{base}", **F32_BF16, "parameters": {"lambda": 0.9},
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.7}},
                   {"model": "{ft2}", "parameters": {"weight": [0.3, 0.6]}}]}},
    {"name": "task_arithmetic_normalize", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "dtype": "float32",
        "parameters": {"normalize": True},
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.7}},
                   {"model": "{ft2}", "parameters": {"weight": 0.4}},
                   {"model": "{ft3}", "parameters": {"weight": 0.2}}]}},
    # --- TIES and friends ----------------------------------------------------------------------------------------
    {"name": "ties_f32", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "ties", "base_model": "{base}", "dtype": "float32",
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "{ft2}", "parameters": {"weight": 0.4, "density": 0.7}},
                   {"model": "{ft3}", "parameters": {"weight": 0.5, "density": 0.3}}]}},
    {"name": "ties_nonorm_lambda_f32", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "ties", "base_model": "{base}", "dtype": "float32",
        "parameters": {"normalize": False, "lambda": 1.2},
        "models": [{"model": "{ft1}", "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.3}],
                                                     "density": [0.2, 0.9]}},
                   {"model": "{ft2}", "parameters": {"weight": 0.5, "density": 1.0}}]}},
    {"name": "ties_bf16", "family": "bf16", "expect": {"frac": 0.01}, "config": {
        "merge_method": "ties", "base_model": "{base}", **F32_BF16,
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "{ft2}", "parameters": {"weight": 0.4, "density": 0.7}},
                   {"model": "{ft3}", "parameters": {"weight": 0.5, "density": 0.3}}]}},
    {"name": "dare_ties_density1", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "dare_ties", "base_model": "{base}", "dtype": "float32",
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.6, "density": 1.0}},
                   {"model": "{ft2}", "parameters": {"weight": 0.4, "density": 1.0}}]}},
    {"name": "dare_linear_density1", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "dare_linear", "base_model": "{base}", **F32_BF16,
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.6, "density": 1.0}},
                   {"model": "{ft3}", "parameters": {"weight": 0.4, "density": 1.0}}]}},
    {"name": "breadcrumbs_f32", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "breadcrumbs", "base_model": "{base}", "dtype": "float32",
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
                   {"model": "{ft2}", "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.1}}]}},
    {"name": "breadcrumbs_ties_f32", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "breadcrumbs_ties", "base_model": "{base}", "dtype": "float32",
        "parameters": {"density": 0.6, "gamma": 0.1},
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.5}},
                   {"model": "{ft2}", "parameters": {"weight": 0.3}},
                   {"model": "{ft3}", "parameters": {"weight": 0.4}}]}},
    # --- SLERP family ----------------------------------------------------------------------------------------------
    {"name": "slerp_gradient_filters", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "slerp", "base_model": "{base}", **F32_BF16,
        "slices": [{"sources": [{"model": "{base}", "layer_range": [0, 4]}, {"model": "{ft1}", "layer_range": [0, 4]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]}}},
    {"name": "slerp_models_f32", "family": "f32", "expect": {"atol": 5e-7}, "config": {
        "merge_method": "slerp", "base_model": "{ft2}", "dtype": "float32", "parameters": {"t": 0.3},
        "models": [{"model": "{ft2}"}, {"model": "{ft1}"}]}},
    {"name": "nuslerp_base", "family": "f32", "expect": {"atol": 5e-7}, "config": {
        "merge_method": "nuslerp", "base_model": "{base}", "dtype": "float32",
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.7}},
                   {"model": "{ft2}", "parameters": {"weight": 0.3}}]}},
    {"name": "nuslerp_nobase_rowwise", "family": "bf16", "expect": {"atol": 0.0079, "frac": 1e-3}, "config": {
        "merge_method": "nuslerp", **F32_BF16, "parameters": {"nuslerp_row_wise": True},
        "models": [{"model": "{ft1}", "parameters": {"weight": 1.0}},
                   {"model": "{ft3}", "parameters": {"weight": 2.0}}]}},
    {"name": "nuslerp_noflatten", "family": "f32", "expect": {"atol": 5e-7}, "config": {
        "merge_method": "nuslerp", "base_model": "{base}", "dtype": "float32",
        "parameters": {"nuslerp_flatten": False},
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.4}},
                   {"model": "{ft3}", "parameters": {"weight": 0.6}}]}},
    # --- model stock ---------------------------------------------------------------------------------------------
    {"name": "model_stock", "family": "f32", "expect": {"atol": 5e-7}, "config": {
        "merge_method": "model_stock", "base_model": "{base}", "dtype": "float32",
        "models": [{"model": "{ft1}"}, {"model": "{ft2}"}, {"model": "{ft3}"}]}},
    {"name": "model_stock_filter_wise", "family": "bf16", "expect": {"atol": 0.0079, "frac": 1e-3}, "config": {
        "merge_method": "model_stock", "base_model": "{base}", **F32_BF16,
        "parameters": {"filter_wise": True},
        "models": [{"model": "{ft1}"}, {"model": "{ft2}"}]}},
    # --- passthrough / slices ----------------------------------------------------------------------------------------
    {"name": "passthrough_stack", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "passthrough", "dtype": "bfloat16",
        "slices": [{"sources": [{"model": "{ft1}", "layer_range": [0, 3]}]},
                   {"sources": [{"model": "{ft2}", "layer_range": [1, 4]}]}]}},
    {"name": "passthrough_scale", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": "{ft1}", "layer_range": [0, 4],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                          {"filter": "down_proj", "value": 0.25},
                                                          {"value": 1.0}]}}]}]}},
    {"name": "linear_slices", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "linear", **F32_BF16,
        "slices": [{"sources": [{"model": "{ft1}", "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                                {"model": "{ft2}", "layer_range": [0, 2], "parameters": {"weight": 0.7}}]},
                   {"sources": [{"model": "{ft1}", "layer_range": [2, 4], "parameters": {"weight": [0.1, 0.9]}},
                                {"model": "{ft3}", "layer_range": [2, 4], "parameters": {"weight": 0.5}}]}]}},
    # --- methods added after the first set (MergeKit 0.1.5 semantics) -------------------------------------------
    {"name": "multislerp_base", "family": "bf16", "expect": {"atol": 0.0079, "frac": 1e-3}, "config": {
        "merge_method": "multislerp", "base_model": "{base}", **F32_BF16,
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.5}},
                   {"model": "{ft2}", "parameters": {"weight": 0.3}},
                   {"model": "{ft3}", "parameters": {"weight": 0.2}}]}},
    {"name": "multislerp_nobase_f32", "family": "f32", "expect": {"atol": 1e-6}, "config": {
        "merge_method": "multislerp", "dtype": "float32", "parameters": {"normalize_weights": False},
        "models": [{"model": "{ft1}", "parameters": {"weight": 0.6}},
                   {"model": "{ft2}", "parameters": {"weight": 0.6}}]}},
    {"name": "karcher_f32", "family": "f32", "expect": {"atol": 1e-6}, "config": {
        "merge_method": "karcher", "dtype": "float32",
        "models": [{"model": "{ft1}"}, {"model": "{ft2}"}, {"model": "{ft3}"}]}},
    {"name": "sce_f32", "family": "f32", "expect": {"atol": 1e-6}, "config": {
        "merge_method": "sce", "base_model": "{base}", "dtype": "float32", "parameters": {"select_topk": 0.5},
        "models": [{"model": "{ft1}"}, {"model": "{ft2}"}, {"model": "{ft3}"}]}},
    {"name": "sce_all_bf16", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "sce", "base_model": "{base}", **F32_BF16,
        "models": [{"model": "{ft1}"}, {"model": "{ft2}"}]}},
    {"name": "nearswap", "family": "bf16", "expect": "bitwise", "config": {
        "merge_method": "nearswap", "base_model": "{base}", **F32_BF16, "parameters": {"t": 0.01},
        "models": [{"model": "{base}"}, {"model": "{ft2}"}]}},
    # softmax/log run through torch's vectorised exp/log, whose last bit depends on the CPU's SIMD level: the stored
    # output (made on an AVX-512 machine) is matched byte for byte there; on an AVX2-only CPU ~0.005 % of entries,
    # whose importance sits within rounding of the median + 1.5·IQR threshold, flip between base and model.
    {"name": "arcee_fusion_f32", "family": "f32", "expect": {"frac": 1e-3}, "config": {
        "merge_method": "arcee_fusion", "base_model": "{base}", "dtype": "float32",
        "models": [{"model": "{base}"}, {"model": "{ft1}"}]}},
    {"name": "ram_f32", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "ram", "base_model": "{base}", "dtype": "float32",
        "models": [{"model": "{ft1}"}, {"model": "{ft3}"}]}},
    {"name": "ramplus_tl_f32", "family": "f32", "expect": "bitwise", "config": {
        "merge_method": "ramplus_tl", "base_model": "{base}", "dtype": "float32",
        "parameters": {"r": 0.2, "alpha": 0.3},
        "models": [{"model": "{ft1}"}, {"model": "{ft3}"}]}},
]
