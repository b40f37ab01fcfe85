"""mergeline against MergeKit 0.1.5 on the parity cases of ``tests/mergekit_cases.py``.

    .venv/bin/python bench/mergekit_parity.py            # ours vs the stored MergeKit outputs (no MergeKit needed)
    .venv/bin/python bench/mergekit_parity.py --regen    # rerun MergeKit (bench/.venv-mergekit) and store its outputs
    .venv/bin/python bench/mergekit_parity.py --live     # rerun MergeKit and compare, store nothing

Prints one line per case: tensors byte-identical to MergeKit's, max |ours − MergeKit|, the fraction of entries that
differ, and whether that is within what the case promises. Inputs are rebuilt from numpy's seeded generator
(``tests/parity_models.py``), so the stored outputs stay valid on any machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mergekit_cases import CASES  # noqa: E402
from tests.mergekit_parity import (  # noqa: E402
    GOLDEN_DIR, compare, families, fingerprints, golden_file, load_tensors, resolve, run_ours,
)

MK_VENV = ROOT / "bench" / ".venv-mergekit"


def run_mergekit(case: dict, fams, work: Path) -> Path:
    cfg = resolve(case["config"], fams[case["family"]])
    cfg_file = work / f"{case['name']}.yml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = work / f"mk-{case['name']}"
    cmd = [str(MK_VENV / "bin" / "mergekit-yaml"), str(cfg_file), str(out), "--allow-crimes", "--no-copy-tokenizer",
           "--quiet", "--lora-merge-cache", str(work / "lora-cache"), "--random-seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"MergeKit failed on {case['name']}:\n{r.stderr[-3000:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regen", action="store_true", help="run MergeKit and store its outputs as the golden files")
    ap.add_argument("--live", action="store_true", help="run MergeKit and compare without storing")
    ap.add_argument("--cases", default="", help="comma list of case names (default: all)")
    a = ap.parse_args()
    cases = [c for c in CASES if not a.cases or c["name"] in a.cases.split(",")]
    if (a.regen or a.live) and not (MK_VENV / "bin" / "mergekit-yaml").exists():
        print(f"MergeKit venv missing: run bench/setup_mergekit.sh first ({MK_VENV})", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="mergeline-parity-"))
    failed = 0
    try:
        fams = families(work / "inputs")
        if a.regen:
            GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        for case in cases:
            if a.regen or a.live:
                mk_out = run_mergekit(case, fams, work)
                theirs = load_tensors(mk_out)
                if a.regen:
                    from safetensors.torch import save_file
                    save_file({k: v.contiguous() for k, v in sorted(theirs.items())}, str(golden_file(case["name"])))
            else:
                theirs = load_tensors(golden_file(case["name"]))
            ours = run_ours(case, fams, work / f"ours-{case['name']}")
            agreement = compare(case["name"], ours, theirs)
            failed += not agreement.ok(case["expect"])
            print(agreement.line(case["expect"]), flush=True)
        if a.regen:
            from importlib.metadata import version  # noqa: F401
            mk_version = subprocess.run([str(MK_VENV / "bin" / "python"), "-c",
                                         "from importlib.metadata import version; print(version('mergekit'))"],
                                        capture_output=True, text=True).stdout.strip()
            meta = {"mergekit": mk_version, "inputs": fingerprints(fams),
                    "cases": {c["name"]: c["config"] for c in CASES}}
            (GOLDEN_DIR / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(cases) - failed}/{len(cases)} cases within their promise")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
