"""mergeline against MergeKit 0.1.5's own outputs on the same configs and inputs.

The outputs in ``tests/data/mergekit_golden`` were produced by ``mergekit-yaml`` itself
(``bench/mergekit_parity.py --regen``, MergeKit in ``bench/.venv-mergekit``) from inputs that
``tests/parity_models.py`` rebuilds byte for byte from a seeded numpy generator. Every case states what it
promises (``tests/mergekit_cases.py``): byte-identical tensors for linear, task arithmetic, TIES / breadcrumbs on
float32 deltas, DARE at density 1, SLERP to bf16, passthrough and slices, LoRA references; a float32 ulp or two
where only the order of a whole-tensor reduction differs (SLERP/NuSLERP/model stock in float32); and a bounded
fraction of entries for TIES on tied bf16 deltas (a documented difference).
"""

from __future__ import annotations

import pytest

from tests.mergekit_cases import CASES
from tests.mergekit_parity import compare, families, fingerprints, golden_file, golden_meta, load_tensors, run_ours


@pytest.fixture(scope="module")
def fams(tmp_path_factory):
    fams = families(tmp_path_factory.mktemp("parity-inputs"))
    meta = golden_meta()
    assert fingerprints(fams) == meta["inputs"], (
        "the parity inputs no longer match the ones the stored MergeKit outputs were made from: rerun "
        "`.venv/bin/python bench/mergekit_parity.py --regen` (needs bench/setup_mergekit.sh)")
    return fams


def test_every_case_has_a_golden_output():
    meta = golden_meta()
    for case in CASES:
        assert golden_file(case["name"]).exists(), f"no MergeKit output stored for {case['name']}"
        assert meta["cases"][case["name"]] == case["config"], f"case {case['name']} changed since its golden output"
    assert meta["mergekit"] == "0.1.5"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_mergekit(case, fams, tmp_path):
    ours = run_ours(case, fams, tmp_path / "out")
    agreement = compare(case["name"], ours, load_tensors(golden_file(case["name"])))
    assert agreement.ok(case["expect"]), agreement.line(case["expect"])
    if case["expect"] == "bitwise":
        assert agreement.max_abs == 0.0
