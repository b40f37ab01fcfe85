"""Helpers for tests/test_live_ui.py: run `dagster dev` on a free loopback port and talk GraphQL to it.

`dagster dev` spawns a webserver, a daemon and code-server processes. Started with ``start_new_session=True`` they all
share one new process group, which :meth:`DagsterDev.stop` interrupts (SIGINT: dagster's own graceful shutdown),
then kills if anything outlives the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCATION = "mergeline_examples"
REPOSITORY = "__repository__"  # the repository name of a Definitions-based code location, in selectors and UI paths

WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

ASSET_NODES_QUERY = """
query {
  assetNodes {
    assetKey { path }
    dependencyKeys { path }
    groupName
  }
}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dagster_executable() -> list[str]:
    """`dagster` next to the running interpreter (the venv's), else `python -m dagster`."""
    exe = Path(sys.executable).with_name("dagster")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dagster"]


class DagsterDev:
    """One `dagster dev -w workspace.yaml` process group, with its output in ``log_path``."""

    def __init__(self, dagster_home: Path, store: Path, port: int | None = None):
        self.home = dagster_home
        self.store = store
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = dagster_home / "dagster-dev.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        # no telemetry, no first-visit "welcome" dialog covering the UI in screenshots
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
        env = dict(os.environ)
        env.pop("MERGELINE_PIPELINES", None)  # serve the shipped examples, whatever the caller's shell says
        env.update(
            DAGSTER_HOME=str(self.home),
            MERGELINE_STORE=str(self.store),
            DAGSTER_DISABLE_TELEMETRY="1",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        # make sure `pipelines` imports from this checkout even without an editable install
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*dagster_executable(), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # session leader: its pid is the process group id
            _signal_group(pgid, signal.SIGINT)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            # the leader may be gone while a child (webserver, daemon, code server) still lingers: kill the group
            deadline = time.monotonic() + 5.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n_chars:].decode("utf-8", "replace")
        except OSError:
            return "<no log>"

    # -- GraphQL --------------------------------------------------------------------------------------------------
    def graphql(self, query: str, variables: dict | None = None, timeout: float = 10.0) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(
            f"{self.base_url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = json.loads(resp.read())
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def wait_loaded(self, location: str = LOCATION, timeout_s: float = 120.0) -> float:
        """Poll ``workspaceOrError`` until ``location`` is LOADED; return the seconds it took.

        Raises AssertionError with the code location's load error (or the server's log) otherwise."""
        t0 = time.monotonic()
        last = "no answer yet"
        while time.monotonic() - t0 < timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"`dagster dev` exited with code {self.proc.returncode} before {location!r} loaded:\n"
                    f"{self.log_tail()}"
                )
            try:
                ws = self.graphql(WORKSPACE_QUERY, timeout=5.0)["workspaceOrError"]
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = f"webserver not answering: {exc}"
                time.sleep(0.5)
                continue
            if ws["__typename"] != "Workspace":
                last = f"workspaceOrError: {ws}"
                time.sleep(0.5)
                continue
            entries = {e["name"]: e for e in ws["locationEntries"]}
            entry = entries.get(location)
            if entry is None:
                last = f"no location {location!r} among {sorted(entries)}"
            else:
                err = entry["locationOrLoadError"] or {}
                if err.get("__typename") == "PythonError":
                    raise AssertionError(
                        f"code location {location!r} failed to load:\n{err.get('message')}\n{''.join(err.get('stack') or [])}"
                    )
                if entry["loadStatus"] == "LOADED" and err.get("__typename") == "RepositoryLocation":
                    return time.monotonic() - t0
                last = f"loadStatus={entry['loadStatus']} ({err.get('__typename')})"
            time.sleep(0.5)
        raise AssertionError(
            f"code location {location!r} not loaded after {timeout_s:.0f} s ({last}); dagster dev log:\n{self.log_tail()}"
        )

    def asset_nodes(self) -> list[dict]:
        return self.graphql(ASSET_NODES_QUERY, timeout=30.0)["assetNodes"]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
