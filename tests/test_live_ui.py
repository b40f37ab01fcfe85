"""Live checks against a real `dagster dev` (issue 3, "Proof required"):

* the code location defined by workspace.yaml loads, and its GraphQL asset graph has every node kind of the demo
  pipeline with the true lineage edges (base → finetune, dataset → finetune, finetune → lora, lora → merged,
  base → merged);
* a headless Chromium (Debian's `chromium`, driven by Playwright WITHOUT its browser download) renders the demo's
  lineage page with the merged model node, and the screenshot is a real PNG.

One `dagster dev` serves both tests (module-scoped fixture), on a free loopback port with a throw-away DAGSTER_HOME.
The browser prerequisites come from scripts/install_browser.sh: run as root (CI, fresh machine) the test installs
them itself; otherwise the screenshot test skips with the command to run.
Set MERGELINE_UI_SCREENSHOT=/some/path.png to keep a copy of the screenshot (e.g. as a CI artifact).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import struct
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.live_helpers import LOCATION, REPO, REPOSITORY, DagsterDev

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(300)]

GROUP = "demo"
DEMO_SPEC = REPO / "pipelines" / "examples" / GROUP / "pipeline.yaml"
CHROMIUM = os.environ.get("MERGELINE_CHROMIUM", "/usr/bin/chromium")
INSTALL_SCRIPT = REPO / "scripts" / "install_browser.sh"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


# ----------------------------------------------------------------------------------------------------------------
# expected graph, derived from the demo's pipeline.yaml (so renaming a node in the example does not break the test)
# ----------------------------------------------------------------------------------------------------------------
def _key(kind: str, name: str) -> tuple[str, ...]:
    return (kind, GROUP, name)


def expected_demo_edges() -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """asset key → the upstream keys it must depend on, for the node kinds the demo has."""
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    bases, datasets = spec.get("base_models") or {}, spec.get("datasets") or {}
    finetunes, merges = spec.get("finetunes") or {}, spec.get("merges") or {}
    assert bases and datasets and finetunes and merges, f"{DEMO_SPEC} no longer has every node kind"

    def model_key(name: str) -> tuple[str, ...]:
        # a merge input names a fine-tune (its LoRA checkpoint), another merge, or a base model
        if name in finetunes:
            return _key("lora", name)
        if name in merges:
            return _key("merged", name)
        if name in bases:
            return _key("base_model", name)
        raise AssertionError(f"{DEMO_SPEC}: merge input {name!r} is not a known node")

    edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for name in bases:
        edges[_key("base_model", name)] = set()
    for name in datasets:
        edges[_key("dataset", name)] = set()
    for name, ft in finetunes.items():
        edges[_key("finetune", name)] = {_key("base_model", ft["base"]), _key("dataset", ft["dataset"])}
        edges[_key("lora", name)] = {_key("finetune", name)}
    for name, m in merges.items():
        ups = {model_key(entry["model"] if isinstance(entry, dict) else entry) for entry in m["models"]}
        if m.get("base_model"):
            ups.add(model_key(m["base_model"]))
        edges[_key("merged", name)] = ups
    return edges


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    root = tmp_path_factory.mktemp("dagster_dev")
    server = DagsterDev(root / "home", root / "store")
    t0 = time.monotonic()
    server.start()
    try:
        load_s = server.wait_loaded(LOCATION, timeout_s=120)
        print(f"\n`dagster dev` on {server.base_url}: {LOCATION} loaded in {load_s:.1f} s")
        yield server
    finally:
        t1 = time.monotonic()
        server.stop()
        print(f"`dagster dev` stopped in {time.monotonic() - t1:.1f} s (up {time.monotonic() - t0:.1f} s)")


def _browser_ready() -> tuple[bool, str]:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"chromium ({CHROMIUM})")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python package")
    return (not missing, " and ".join(missing))


@pytest.fixture(scope="module")
def chromium_path():
    ok, missing = _browser_ready()
    if not ok:
        if os.geteuid() != 0:
            pytest.skip(f"missing {missing}; not root, so not installing it: run scripts/install_browser.sh as root")
        # a fresh (CI) machine: install them, as ./dev.sh would
        venv = Path(sys.executable).parent.parent
        res = subprocess.run(["bash", str(INSTALL_SCRIPT), str(venv)], capture_output=True, text=True, timeout=600)
        importlib.invalidate_caches()
        ok, missing = _browser_ready()
        assert res.returncode == 0 and ok, (
            f"{INSTALL_SCRIPT} did not provide {missing} (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return CHROMIUM


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
def test_graphql_asset_graph_has_every_node_kind_and_lineage(dagster_dev):
    nodes = dagster_dev.asset_nodes()
    graph = {
        tuple(n["assetKey"]["path"]): {tuple(d["path"]) for d in n["dependencyKeys"]}
        for n in nodes
        if n["groupName"] == GROUP
    }
    assert graph, f"no asset in group {GROUP!r}; groups: {sorted({n['groupName'] for n in nodes})}"

    kinds = {key[0] for key in graph}
    for kind in ("base_model", "dataset", "finetune", "lora", "merged"):
        assert kind in kinds, f"no {kind}/… asset in group {GROUP!r}: {sorted(graph)}"
    assert all(key[1] == GROUP for key in graph), f"asset keys are not <kind>/{GROUP}/<name>: {sorted(graph)}"

    expected = expected_demo_edges()
    for key, ups in expected.items():
        assert key in graph, f"{'/'.join(key)} missing from the served asset graph: {sorted(graph)}"
        assert ups <= graph[key], (
            f"{'/'.join(key)} should depend on {sorted(ups)}, the server says {sorted(graph[key])}"
        )

    # lineage by kind, as a person reads the graph: no LoRA without its fine-tune, no merge without LoRA inputs
    def deps_of(kind: str) -> set[str]:
        return {up[0] for key, ups in graph.items() if key[0] == kind for up in ups}

    assert {"base_model", "dataset"} <= deps_of("finetune")
    assert deps_of("lora") >= {"finetune"}
    assert {"lora", "base_model"} <= deps_of("merged")
    assert not deps_of("base_model") and not deps_of("dataset"), "base models / datasets are roots of the demo"
    # every merged model is reached from a base model and a dataset through the graph
    for key in (k for k in graph if k[0] == "merged"):
        seen, todo = set(), [key]
        while todo:
            k = todo.pop()
            for up in graph.get(k, ()):
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        assert {"base_model", "dataset", "finetune", "lora"} <= {k[0] for k in seen}, (key, sorted(seen))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_lineage_page_renders_merged_model_in_headless_chromium(chromium_path, dagster_dev, tmp_path):
    # chromium_path first: a skip (no browser, not root) happens before the server would start
    from playwright.sync_api import sync_playwright

    expected = expected_demo_edges()
    merged_names = sorted(k[2] for k in expected if k[0] == "merged")
    all_names = sorted({k[2] for k in expected})
    url = f"{dagster_dev.base_url}/locations/{REPOSITORY}@{LOCATION}/asset-groups/{GROUP}"
    shot = tmp_path / f"lineage_{GROUP}.png"
    width, height = 1600, 1000

    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            # asset graph nodes carry the asset's name as their title (the last key component)
            for name in merged_names:
                node = page.get_by_text(name, exact=True).first
                node.wait_for(state="visible", timeout=60_000)
                box = node.bounding_box()
                assert box and 0 <= box["x"] < width and 0 <= box["y"] < height, f"{name} drawn off-screen: {box}"
            for name in all_names:
                page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=30_000)
            page.wait_for_timeout(500)  # let edges and tags finish painting
            assert "/asset-groups/" in page.url, f"redirected away from the lineage page: {page.url}"
            page.screenshot(path=str(shot), full_page=False)
        finally:
            browser.close()
    print(f"\nlineage screenshot {shot} in {time.monotonic() - t0:.1f} s")

    data = shot.read_bytes()
    assert _png_size(data) == (width, height)
    assert len(data) > 20_000, f"suspiciously small screenshot ({len(data)} bytes): blank page?"
    try:
        from PIL import Image
    except ImportError:  # pillow comes with matplotlib; the size check above still holds without it
        pass
    else:
        with Image.open(shot) as im:
            colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, f"screenshot has only {len(colors)} colours: blank page?"

    keep = os.environ.get("MERGELINE_UI_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)
