"""Benchmark `mergeline` (wall time, peak RSS) per merge method, optionally against MergeKit 0.1.5 and PEFT.

Every run is one process wrapped in ``/usr/bin/time -v``: wall time is measured around it, peak RSS is its
"Maximum resident set size". Each method runs ``--repeats`` times (default 3) and MEDIANS are reported. With
``--compare`` MergeKit (``mergekit-yaml``) and the PEFT baseline run in the same invocation, interleaved with ours
repeat by repeat (ours, theirs, ours, theirs, ...) so background load hits both alike, and ratios theirs/ours are
printed. Outputs go to WORKDIR/out and are deleted after each run; inputs are made by make_models.py if missing.

    .venv/bin/python bench/run_bench.py                              # all methods, ours only, scale 1
    .venv/bin/python bench/run_bench.py --compare --methods ties,linear,lora
    .venv/bin/python bench/run_bench.py --scale 3 --methods linear,lora --repeats 1   # flat-memory check

Needs only the Python standard library (models are generated with the project venv's python; see --python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ALL_METHODS = [
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "model_stock", "passthrough", "lora",
]
DEFAULT_COMPARE = ["ties", "linear", "lora"]
STOCHASTIC = {"dare_linear", "dare_ties", "della", "della_linear"}
THIRD = 0.3333333333333333
NUM_LAYERS = {"tiny": 4, "1": 24, "3": 30}  # must match make_models.PRESETS


# ---------------------------------------------------------------------------------------------------- configs
def method_config(method: str, models: Path, dtype: str) -> dict:
    """A MergeKit-style config (as MergeKit users write them) for ``method`` over the generated models."""
    base = str(models / "base")
    fts = [str(models / f"ft{k}") for k in (1, 2, 3)]

    def each(params: dict) -> list[dict]:
        return [{"model": m, "parameters": dict(params)} for m in fts]

    gta = {
        "task_arithmetic": {"weight": THIRD},
        "ties": {"density": 0.5, "weight": THIRD},
        "dare_linear": {"density": 0.5, "weight": THIRD},
        "dare_ties": {"density": 0.5, "weight": THIRD},
        "breadcrumbs": {"density": 0.9, "gamma": 0.01, "weight": THIRD},
        "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01, "weight": THIRD},
        "della": {"density": 0.5, "epsilon": 0.1, "weight": THIRD},
        "della_linear": {"density": 0.5, "epsilon": 0.1, "weight": THIRD},
    }
    if method == "linear":
        return {"merge_method": "linear", "models": each({"weight": THIRD}), "dtype": dtype}
    if method in gta:
        return {"merge_method": method, "base_model": base, "models": each(gta[method]), "dtype": dtype}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": fts[0]}],
                "parameters": {"t": 0.5}, "dtype": dtype}
    if method == "nuslerp":
        return {"merge_method": "nuslerp", "models": [{"model": fts[0], "parameters": {"weight": 0.5}},
                                                      {"model": fts[1], "parameters": {"weight": 0.5}}],
                "dtype": dtype}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": base, "models": [{"model": m} for m in fts],
                "dtype": dtype}
    if method == "passthrough":
        n = NUM_LAYERS[models.name.removeprefix("scale")]
        return {"merge_method": "passthrough", "dtype": dtype, "slices": [
            {"sources": [{"model": fts[0], "layer_range": [0, n // 2]}]},
            {"sources": [{"model": fts[1], "layer_range": [n // 2, n]}]},
        ]}
    raise ValueError(f"no config for method {method!r}")


def to_yaml(obj, indent: int = 0) -> str:
    """A tiny YAML emitter for the config shapes above (dicts, lists, scalars): no PyYAML needed."""
    pad = "  " * indent
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, list) and v and all(not isinstance(x, (dict, list)) for x in v):
                out.append(f"{pad}{k}: [{', '.join(_scalar(x) for x in v)}]")
            elif isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:")
                out.append(to_yaml(v, indent + 1))
            else:
                out.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and v:
                body = to_yaml(v, indent + 1).splitlines()
                out.append(f"{pad}- {body[0].lstrip()}")
                out.extend(body[1:])
            elif isinstance(v, list):
                out.append(f"{pad}- {json.dumps(v)}")
            else:
                out.append(f"{pad}- {_scalar(v)}")
    return "\n".join(out)


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    s = str(v)
    if re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./@+-]*", s) and s.lower() not in ("true", "false", "null", "yes", "no",
                                                                              "on", "off", "y", "n", "~"):
        return s
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


# ----------------------------------------------------------------------------------------------- measurement
@dataclass
class Run:
    tool: str
    method: str
    ok: bool
    wall_s: float
    rss_mb: float | None
    user_s: float | None = None
    sys_s: float | None = None
    rc: int = 0
    error: str = ""
    out_bytes: int = 0


@dataclass
class Summary:
    tool: str
    method: str
    runs: list[Run] = field(default_factory=list)

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def wall(self) -> float | None:
        ok = self.ok_runs
        return statistics.median(r.wall_s for r in ok) if ok else None

    @property
    def rss(self) -> float | None:
        ok = [r.rss_mb for r in self.ok_runs if r.rss_mb is not None]
        return statistics.median(ok) if ok else None


TIMER = ["/usr/bin/time", "-v"]  # or bench/rusage_time.py where GNU time is missing (main() decides)


def parse_time_v(text: str) -> dict:
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["rss_mb"] = int(m.group(1)) / 1024
    m = re.search(r"User time \(seconds\): ([\d.]+)", text)
    if m:
        out["user_s"] = float(m.group(1))
    m = re.search(r"System time \(seconds\): ([\d.]+)", text)
    if m:
        out["sys_s"] = float(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["elapsed_s"] = secs
    return out


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def _remove_output(out_dir: Path) -> None:
    """Delete an output and any temporary siblings a killed writer left (e.g. ``.NAME.tmp-PID-...``)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


def timed(tool: str, method: str, cmd: list[str], out_dir: Path, timeout: float, log_dir: Path,
          env: dict | None = None, verbose: bool = False) -> Run:
    _remove_output(out_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("r", suffix=".time", dir=log_dir, delete=False) as tf:
        time_file = Path(tf.name)
    log = log_dir / f"{tool}-{method}.log"
    full = TIMER + ["-o", str(time_file)] + cmd
    if verbose:
        print("    $ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    p = None
    try:
        with open(log, "w") as lf:
            lf.write("$ " + shlex.join(cmd) + "\n")
            lf.flush()
            p = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                 start_new_session=True)  # own process group: a timeout ends the tool too
            try:
                rc = p.wait(timeout=timeout)
                err = ""
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc, err = -1, f"timeout after {timeout:.0f} s"
    except KeyboardInterrupt:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        _remove_output(out_dir)
        raise
    wall = time.perf_counter() - t0
    tv = parse_time_v(time_file.read_text()) if time_file.exists() else {}
    time_file.unlink(missing_ok=True)
    has_weights = out_dir.exists() and any(out_dir.glob("*.safetensors"))
    ok = rc == 0 and has_weights
    if not ok and not err:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        err = (f"exit {rc}" if rc else "no *.safetensors in output") + ": " + " | ".join(tail)[-1500:]
    out_bytes = dir_bytes(out_dir)
    _remove_output(out_dir)
    return Run(tool, method, ok, wall, tv.get("rss_mb"), tv.get("user_s"), tv.get("sys_s"), rc, err, out_bytes)


# ---------------------------------------------------------------------------------------------------- main
def ensure_models(scale: str, models_root: Path, python: str) -> Path:
    cmd = [python, str(HERE / "make_models.py"), "--scale", scale, "--workdir", str(models_root)]
    print("[bench] " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return models_root / f"scale{scale}"


def fmt(v, digits=1):
    return "—" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all",
                    help=f"comma list or 'all' (default): {','.join(ALL_METHODS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", default="1", choices=["tiny", "1", "3"], help="model preset of make_models.py")
    ap.add_argument("--compare", action="store_true",
                    help="also time MergeKit 0.1.5 / the PEFT baseline (bench/.venv-mergekit) in the same run")
    ap.add_argument("--compare-methods", default=",".join(DEFAULT_COMPARE),
                    help="methods timed with MergeKit/PEFT under --compare (comma list or 'all'; default "
                         f"{','.join(DEFAULT_COMPARE)}; MergeKit takes minutes per run)")
    ap.add_argument("--no-ours", action="store_true", help="skip mergeline (e.g. to record baselines only)")
    ap.add_argument("--workdir", type=Path, default=HERE / ".work",
                    help="models/, configs/, out/, logs/ and results live here (default bench/.work)")
    ap.add_argument("--mergeline", default=str(REPO / ".venv" / "bin" / "mergeline"))
    ap.add_argument("--mergekit-venv", type=Path, default=HERE / ".venv-mergekit")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="python with torch + tokenizers, used to generate the models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", default="bfloat16", help="`dtype:` written into every config (default bfloat16)")
    ap.add_argument("--ours-args", default="", help="extra arguments for `mergeline merge`/`merge-lora`")
    ap.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml")
    ap.add_argument("--timeout", type=float, default=3600, help="per-run timeout in seconds")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP_NUM_THREADS/MKL_NUM_THREADS for every run (default: leave the environment)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each command")
    a = ap.parse_args(argv)

    methods = ALL_METHODS if a.methods == "all" else [m.strip() for m in a.methods.split(",") if m.strip()]
    compare = set(ALL_METHODS if a.compare_methods == "all" else a.compare_methods.split(",")) if a.compare else set()
    unknown = [m for m in methods + sorted(compare) if m not in ALL_METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {ALL_METHODS}")
    if not Path("/usr/bin/time").exists():
        # same wait4 rusage GNU time reads; see rusage_time.py
        print("[bench] /usr/bin/time not installed: timing with bench/rusage_time.py", flush=True)
        TIMER[:] = [sys.executable, str(HERE / "rusage_time.py")]
    if not a.no_ours and not (Path(a.mergeline).exists() or shutil.which(a.mergeline)):
        ap.error(f"mergeline CLI not found at {a.mergeline} (install the project into .venv, or --no-ours)")
    mk_yaml = a.mergekit_venv / "bin" / "mergekit-yaml"
    mk_py = a.mergekit_venv / "bin" / "python"
    if compare and not mk_yaml.exists():
        ap.error(f"{mk_yaml} missing: run bench/setup_mergekit.sh first")

    workdir = a.workdir.resolve()
    models = ensure_models(a.scale, workdir / "models", a.python)
    cfg_dir = workdir / "configs" / f"scale{a.scale}"
    out_root = workdir / "out"
    log_dir = workdir / "logs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    out_root.mkdir(parents=True, exist_ok=True)
    base, adapter = models / "base", models / "lora_r16"

    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    ours_extra = shlex.split(a.ours_args)
    mk_extra = shlex.split(a.mergekit_args)

    def commands(method: str) -> dict[str, tuple[list[str], Path]]:
        cmds: dict[str, tuple[list[str], Path]] = {}
        if method == "lora":
            out_o, out_t = out_root / "ours-lora", out_root / "peft-lora"
            if not a.no_ours:
                cmds["ours"] = ([a.mergeline, "merge-lora", str(base), str(adapter), str(out_o),
                                 "--device", a.device] + ours_extra, out_o)
            if method in compare:
                cmds["theirs"] = ([str(mk_py), str(HERE / "peft_merge_baseline.py"), str(base), str(adapter),
                                   str(out_t)], out_t)
            return cmds
        cfg = cfg_dir / f"{method}.yaml"
        cfg.write_text(f"# generated by bench/run_bench.py (scale {a.scale})\n"
                       + to_yaml(method_config(method, models, a.dtype)) + "\n")
        out_o, out_t = out_root / f"ours-{method}", out_root / f"mergekit-{method}"
        if not a.no_ours:
            cmds["ours"] = ([a.mergeline, "merge", str(cfg), str(out_o), "--device", a.device,
                             "--seed", str(a.seed)] + ours_extra, out_o)
        if method in compare:
            mk = [str(mk_yaml), str(cfg), str(out_t), "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer",
                  "--no-write-model-card", "--quiet", "--random-seed", str(a.seed)]
            if a.device != "cpu":
                mk += ["--device", a.device]
            cmds["theirs"] = (mk + mk_extra, out_t)
        return cmds

    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[bench] {started}  host {platform.node()}  cpus {os.cpu_count()}  load {load0[0]:.2f}  "
          f"scale {a.scale}  repeats {a.repeats}  methods {','.join(methods)}"
          + (f"  compare {','.join(m for m in methods if m in compare)}" if compare else ""), flush=True)

    results: dict[tuple[str, str], Summary] = {}
    for method in methods:
        cmds = commands(method)
        if not cmds:
            continue
        for rep in range(a.repeats):
            for tool, (cmd, out_dir) in cmds.items():
                label = ("mergeline" if tool == "ours" else ("peft" if method == "lora" else "mergekit"))
                r = timed(label, method, cmd, out_dir, a.timeout, log_dir, env, a.verbose)
                results.setdefault((tool, method), Summary(label, method)).runs.append(r)
                status = "ok" if r.ok else "FAILED: " + r.error
                print(f"  {method:17s} {label:9s} #{rep + 1}: {r.wall_s:8.1f} s  peak RSS {fmt(r.rss_mb, 0):>6s} MB"
                      f"  out {r.out_bytes / 1e9:.2f} GB  {status}", flush=True)
            # a method that fails for every tool does not get more repeats
            if all(not results[(t, method)].runs[-1].ok for t in cmds):
                break

    load1 = os.getloadavg()
    # ------------------------------------------------------------------------------------------------ report
    has_theirs = any(t == "theirs" for t, _ in results)
    lines = []
    if has_theirs:
        lines.append("| method | ours median s | ours peak RSS MB | mergekit/PEFT median s | mergekit/PEFT peak RSS MB "
                     "| ratio (theirs/ours) |")
        lines.append("|---|---:|---:|---:|---:|---:|")
    else:
        lines.append("| method | ours median s | ours peak RSS MB |")
        lines.append("|---|---:|---:|")
    for method in methods:
        o, t = results.get(("ours", method)), results.get(("theirs", method))
        if o is None and t is None:
            continue
        name = "LoRA r16 (merge-lora; baseline PEFT)" if method == "lora" else method
        ow, orss = (o.wall, o.rss) if o else (None, None)
        if o and not o.ok_runs:
            ow_s = "failed"
        else:
            ow_s = fmt(ow)
        row = f"| {name} | {ow_s} | {fmt(orss, 0)} |"
        if has_theirs:
            tw, trss = (t.wall, t.rss) if t else (None, None)
            tw_s = "failed" if (t and not t.ok_runs) else fmt(tw)
            ratio = f"{tw / ow:.1f}×" if (tw and ow) else "—"
            row += f" {tw_s} | {fmt(trss, 0)} | {ratio} |"
        lines.append(row)
    table = "\n".join(lines)
    print()
    print(f"Scale {a.scale} ({models}), {a.repeats} repeat(s), medians; device {a.device}; "
          f"{os.cpu_count()} CPUs; load average {load0[0]:.2f} → {load1[0]:.2f}")
    print(table)
    failures = [r for s in results.values() for r in s.runs if not r.ok]
    if failures:
        print(f"\n{len(failures)} failed run(s); logs in {log_dir}:")
        for r in failures:
            print(f"  {r.tool} {r.method}: {r.error[:400]}")

    res_file = workdir / f"results-scale{a.scale}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    res_file.write_text(json.dumps({
        "started": started, "scale": a.scale, "repeats": a.repeats, "cpus": os.cpu_count(),
        "load_before": load0, "load_after": load1, "argv": sys.argv[1:],
        "summary": [{"tool": s.tool, "method": s.method, "median_wall_s": s.wall, "median_rss_mb": s.rss}
                    for s in results.values()],
        "runs": [asdict(r) for s in results.values() for r in s.runs], "table": table,
    }, indent=2) + "\n")
    print(f"\n[bench] raw results: {res_file}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
