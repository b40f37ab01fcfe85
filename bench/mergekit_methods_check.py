"""Cross-check the MergeKit 0.1.5 methods added to mergeline (multislerp, karcher, sce, nearswap, arcee_fusion) against
MergeKit itself, tensor by tensor, on tiny generated Llama checkpoints.

Runs ``bench/.venv-mergekit/bin/mergekit-yaml CONFIG OUT --allow-crimes --out-shard-size 1B`` and mergeline's
``merge_ops.api.merge`` on the same YAML, then prints a table method × case → max |ours − MergeKit|, the largest
difference relative to the tensor's magnitude, how many elements differ, and whether every tensor is bit-identical.

Cases: ``fp32`` (float32 models, ``dtype: float32``), ``bf16`` (bfloat16 models, ``dtype: bfloat16``: MergeKit then
does its arithmetic in bfloat16, mergeline in float32, so expect bf16-sized differences) and ``bf16>f32`` (bfloat16
models, ``dtype: float32``, ``out_dtype: bfloat16``: both compute in float32 and round once).

Run from the repository root (needs ``bench/setup_mergekit.sh`` first; CPU only, ~1–2 min):

    OMP_NUM_THREADS=1 .venv/bin/python bench/mergekit_methods_check.py [--methods multislerp,sce] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from merge_ops.api import MergeOptions, merge  # noqa: E402
from pipelines.toy_models import save_tiny_llama, save_variant  # noqa: E402

CASES = {"fp32": (torch.float32, {"dtype": "float32"}),
         "bf16": (torch.bfloat16, {"dtype": "bfloat16"}),
         "bf16>f32": (torch.bfloat16, {"dtype": "float32", "out_dtype": "bfloat16"})}


def make_models(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    kw = dict(num_layers=2, hidden=64, vocab=256, tokenizer=False, dtype=dtype)
    base = save_tiny_llama(root / "base", seed=3, **kw)
    models = {"base": base}
    for i, scale in enumerate((0.05, 0.08, 0.03), start=1):
        models[f"ft{i}"] = save_variant(base, root / f"ft{i}", seed=100 + i, scale=scale)
    # sparse task vectors (each keeps a random 40 % of a fine-tune's delta) so that RAM sees unique, shared and
    # untouched elements
    g = torch.Generator().manual_seed(7)
    base_sd = load_dir(base)
    for i in (1, 2, 3):
        sd = {k: torch.where(torch.rand(v.shape, generator=g) < 0.4, v, base_sd[k]).contiguous()
              for k, v in load_dir(models[f"ft{i}"]).items()}
        out = root / f"sp{i}"
        shutil.copytree(models[f"ft{i}"], out, dirs_exist_ok=True)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        models[f"sp{i}"] = out
    # edge cases: a copy of the base (a zero task vector) and the negation of ft1 (antipodal inputs)
    models["base_copy"] = Path(shutil.copytree(base, root / "base_copy", dirs_exist_ok=True))
    neg = root / "neg1"
    shutil.copytree(models["ft1"], neg, dirs_exist_ok=True)
    save_file({k: (-v).contiguous() for k, v in load_dir(models["ft1"]).items()}, str(neg / "model.safetensors"),
              metadata={"format": "pt"})
    models["neg1"] = neg
    return models


def configs(m: dict[str, Path]) -> dict[str, dict]:
    """Method configs as a MergeKit user writes them (the model paths filled in)."""
    def entries(names, params=None):
        return [{"model": str(m[n]), **({"parameters": params[n]} if params else {})} for n in names]

    w3 = {"ft1": {"weight": 0.5}, "ft2": {"weight": 0.3}, "ft3": {"weight": 0.2}}
    return {
        "multislerp+base": {"merge_method": "multislerp", "base_model": str(m["base"]),
                            "models": entries(["ft1", "ft2", "ft3"], w3)},
        "multislerp": {"merge_method": "multislerp", "models": entries(["ft1", "ft2", "ft3"], w3),
                       "parameters": {"normalize_weights": False}},
        "karcher": {"merge_method": "karcher", "models": entries(["ft1", "ft2", "ft3"])},
        "karcher+base": {"merge_method": "karcher", "base_model": str(m["base"]), "models": entries(["ft1", "ft2"]),
                         "parameters": {"max_iter": 20, "tol": 1e-6}},
        "sce": {"merge_method": "sce", "base_model": str(m["base"]), "models": entries(["ft1", "ft2", "ft3"]),
                "parameters": {"select_topk": 0.3}},
        "sce-topk1": {"merge_method": "sce", "base_model": str(m["base"]), "models": entries(["ft1", "ft2"])},
        "nearswap": {"merge_method": "nearswap", "base_model": str(m["base"]), "models": entries(["ft1"]),
                     "parameters": {"t": 0.002}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": str(m["base"]),
                         "models": entries(["base", "ft1"])},
        # edge cases
        "multislerp-zero-tv": {"merge_method": "multislerp", "base_model": str(m["base"]),
                               "models": entries(["ft1", "base_copy", "ft2"],
                                                 {"ft1": {"weight": 0.5}, "base_copy": {"weight": 0.25},
                                                  "ft2": {"weight": 0.25}})},
        "multislerp-antipodal": {"merge_method": "multislerp",
                                 "models": entries(["ft1", "neg1"], {"ft1": {"weight": 1.0}, "neg1": {"weight": 1.0}})},
        "karcher-antipodal": {"merge_method": "karcher", "models": entries(["ft1", "neg1"])},
        "sce-one-model": {"merge_method": "sce", "base_model": str(m["base"]), "models": entries(["ft1"]),
                          "parameters": {"select_topk": 0.5}},
        "nearswap-large-t": {"merge_method": "nearswap", "base_model": str(m["base"]), "models": entries(["ft2"]),
                             "parameters": {"t": 1000.0}},
        "ram": {"merge_method": "ram", "base_model": str(m["base"]), "models": entries(["sp1", "sp2", "sp3"])},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": str(m["base"]),
                       "models": entries(["sp1", "sp2", "sp3"]), "parameters": {"r": 0.5, "alpha": 1.0}},
    }


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ulps_of_element(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a − b| measured in units in the last place (of the output dtype) of max(|a|, |b|) at that element."""
    mag = torch.maximum(a.abs(), b.abs())
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()
    err = (a.double() - b.double()).abs()
    return float((err / ulp).max()) if err.numel() else 0.0


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    names = sorted(set(ours) & set(theirs))
    only = sorted(set(ours) ^ set(theirs))
    max_abs = max_rel = 0.0
    ndiff = nel = max_ulps = 0
    identical = not only
    for n in names:
        a, b = ours[n], theirs[n]
        if a.dtype != b.dtype or a.shape != b.shape:
            identical = False
            b = b.to(a.dtype)
        d = (a.double() - b.double()).abs()
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float(d.max()) / max(float(b.double().abs().max()), 1e-30))
        if a.dtype == b.dtype:
            max_ulps = max(max_ulps, ulps_of_element(a, b))
        k = int((d > 0).sum())
        ndiff += k
        nel += d.numel()
        identical = identical and k == 0 and a.dtype == b.dtype
    return {"max_abs": max_abs, "max_rel": max_rel, "ndiff": ndiff, "numel": nel, "identical": identical,
            "max_ulps": max_ulps, "only_in_one": only}


def run_mergekit(venv: Path, cfg_path: Path, out: Path) -> None:
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(cfg_path), str(out), "--allow-crimes", "--out-shard-size", "1B",
           "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({p.returncode}):\n{p.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all", help="comma list of config names (see configs()) or 'all'")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--mergekit-venv", type=Path, default=HERE / ".venv-mergekit")
    ap.add_argument("--keep", type=Path, help="keep models and outputs here")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--reuse-mergekit", action="store_true",
                    help="with --keep: reuse MergeKit outputs already there (models must be from the same run)")
    a = ap.parse_args()
    if not (a.mergekit_venv / "bin" / "mergekit-yaml").exists():
        ap.error(f"{a.mergekit_venv}/bin/mergekit-yaml missing: run bench/setup_mergekit.sh or pass --mergekit-venv")
    work = a.keep or Path(tempfile.mkdtemp(prefix="mk-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for case in a.cases.split(","):
            dtype, top = CASES[case]
            models = make_models(work / f"models-{case.replace('>', '_')}", dtype)
            cfgs = configs(models)
            names = list(cfgs) if a.methods == "all" else a.methods.split(",")
            for name in names:
                cfg = {**cfgs[name], **top}
                tag = f"{name}-{case}".replace(">", "_")
                cfg_path = work / f"{tag}.yaml"
                cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                ours_dir, theirs_dir = work / f"ours-{tag}", work / f"mk-{tag}"
                reuse = a.reuse_mergekit and any(theirs_dir.glob("*.safetensors"))
                for d in ((ours_dir,) if reuse else (ours_dir, theirs_dir)):
                    shutil.rmtree(d, ignore_errors=True)
                merge(str(cfg_path), ours_dir, MergeOptions(device="cpu", hash_inputs=False, copy_tokenizer=False))
                try:
                    if not reuse:
                        run_mergekit(a.mergekit_venv, cfg_path, theirs_dir)
                except RuntimeError as e:
                    rows.append({"config": name, "case": case, "error": str(e).splitlines()[-1]})
                    print(f"{name} {case}: MergeKit error: {e}", file=sys.stderr)
                    continue
                r = compare(load_dir(ours_dir), load_dir(theirs_dir))
                rows.append({"config": name, "case": case, **r})
                print(f"{name:18s} {case:9s} max_abs={r['max_abs']:.3g} rel={r['max_rel']:.3g} "
                      f"ulps={r['max_ulps']:.3g} "
                      f"differ={r['ndiff']}/{r['numel']} identical={r['identical']}", file=sys.stderr)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| config | case | max abs diff | max diff / max abs | max ulps | elements differing | bit-identical |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['case']} | MergeKit error: {r['error']} | | | | |")
            continue
        print(f"| {r['config']} | {r['case']} | {r['max_abs']:.3g} | {r['max_rel']:.3g} | {r['max_ulps']:.3g} "
              f"| {r['ndiff']} / {r['numel']} "
              f"| {'yes' if r['identical'] else 'no'} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
