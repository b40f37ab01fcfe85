"""The Dagster demo: materialize the demo pipeline into a persistent ``DAGSTER_HOME``, then open the Dagster UI.

    python -m pipelines.demo_dagster              # materialize, then serve http://127.0.0.1:3000 (Ctrl-C stops)
    python -m pipelines.demo_dagster --no-ui      # materialize only
    python -m pipelines.demo_dagster --ui-only    # serve what earlier runs materialized

``DAGSTER_HOME`` defaults to ``.dagster_home/`` in the repo (SQLite storage; a ``dagster.yaml`` limiting the ``gpu``
concurrency pool to one step is written if none exists); the model store is ``$DAGSTER_HOME/mergeline-store``. The
run executes job ``demo__all`` of code location ``mergeline_examples`` (``workspace.yaml``) with the multiprocess
executor, exactly as a launch from the UI would: every step runs in its own process. Nothing is downloaded. Running
it again adds another run to the history; the artifacts' content hashes (data versions) come out identical.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCATION = "mergeline_examples"
PIPELINE = "demo"
DAGSTER_YAML = """\
# Written by `python -m pipelines.demo_dagster` (edit freely; it is not overwritten).
# Storage: the default SQLite files under this directory.
concurrency:
  pools:
    # every pool, i.e. mergeline's `gpu` pool (fine-tunes and merges): as many steps at once as this host has GPUs
    # (1 without a GPU), so two merges never share one GPU (with device: auto each step claims its own GPU)
    default_limit: {gpus}
telemetry:
  enabled: false
nux:
  # no first-visit "join the community" dialog over the lineage page
  enabled: false
"""


def prepare_home(home: Path) -> Path:
    home = home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        from resources.gpu_slots import gpu_count_for_pool

        cfg.write_text(DAGSTER_YAML.replace("{gpus}", str(gpu_count_for_pool())))
    return home


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(home)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the Hub
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def materialize(home: Path, job: str = f"{PIPELINE}__all") -> int:
    """Run the pipeline's job in a child process (multiprocess executor, runs recorded in ``home``)."""
    run_config = home / "demo_run_config.yaml"  # console logs at INFO: step logs without the DEBUG event stream
    run_config.write_text("loggers:\n  console:\n    config:\n      log_level: INFO\n")
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines.definitions", "-a", "defs", "-j", job,
           "-c", str(run_config)]
    print(f"materializing job {job} into DAGSTER_HOME={home} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(home))
    print(f"run finished with exit status {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    return proc.returncode


def report(home: Path, pipeline: str = PIPELINE) -> list[str]:
    """One line per asset of the pipeline: data version and artifact path, from the instance's event log."""
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    from pipelines.definitions import defs

    lines = []
    with dg.DagsterInstance.get() as instance:
        for key in sorted(defs.resolve_asset_graph().get_all_asset_keys()):
            if key.path[1] != pipeline:
                continue
            ev = instance.get_latest_materialization_event(key)
            if ev is None or ev.asset_materialization is None:
                lines.append(f"  {key.to_user_string():40s} not materialized")
                continue
            mat = ev.asset_materialization
            dv = (mat.tags or {}).get("dagster/data_version", "?")
            path = getattr(mat.metadata.get("path"), "value", "")
            loss = mat.metadata.get("final_loss")
            extra = f"  final loss {loss.value:.3f}" if loss is not None else ""
            lines.append(f"  {key.to_user_string():40s} data version {dv[:16]}  {path}{extra}")
    return lines


def _graphql(url: str, query: str, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_loaded(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> bool:
    q = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            entries = _graphql(url, q)["data"]["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return True
        except Exception:
            pass
        time.sleep(1.0)
    return False


def serve(home: Path, host: str, port: int) -> int:
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-h", host, "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(home), start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        print(f"starting the Dagster UI (dagster dev, pid {proc.pid}) ...", flush=True)
        if wait_loaded(url, proc):
            print(f"\nDagster UI: {url}\n  lineage:   {url}/locations/__repository__@{LOCATION}/asset-groups/{PIPELINE}"
                  f"\n  runs:      {url}/runs\nCtrl-C stops it.", flush=True)
        elif proc.poll() is None:
            print(f"the UI is slow to load; keep waiting or open {url}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print("\nstopping the Dagster UI ...", flush=True)
        return 0
    finally:
        if proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def _interruptible() -> None:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt here, even when started as a background job (which inherits
    SIGINT ignored). Installing handlers also means our children start with the default dispositions (exec resets
    handled signals, not ignored ones), so `dagster dev` reacts to the SIGINT we send its process group."""

    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _term)


def main(argv: list[str] | None = None) -> int:
    _interruptible()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("MERGELINE_DEMO_HOME", REPO / ".dagster_home")),
                    help="DAGSTER_HOME (default: .dagster_home/ in the repo)")
    ap.add_argument("--no-ui", action="store_true", help="materialize, print the results, do not start the UI")
    ap.add_argument("--ui-only", action="store_true", help="skip materializing; just start the UI")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    args = ap.parse_args(argv)
    home = prepare_home(args.home)
    if not args.ui_only:
        t0 = time.perf_counter()
        rc = materialize(home)
        print(f"\npipeline '{PIPELINE}' ({time.perf_counter() - t0:.0f} s):")
        for line in report(home):
            print(line)
        if rc != 0:
            print("the run failed; its logs are in the UI (Runs) and above", file=sys.stderr)
            if args.no_ui:
                return rc
    if args.no_ui:
        return 0
    return serve(home, args.host, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
