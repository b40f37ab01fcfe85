"""The Dagster Component: same asset graph as the builder, inline or from a file, resources bound once."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from pipelines.builder import build_definitions
from pipelines.component import MergelinePipeline, MergelineResources

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "pipelines" / "examples" / "demo" / "pipeline.yaml"
SOUP = REPO / "pipelines" / "examples" / "skill_soup" / "pipeline.yaml"


def graph_of(defs: dg.Definitions) -> dict[str, tuple[tuple[str, ...], str | None, frozenset]]:
    g = defs.resolve_asset_graph()
    return {k.to_user_string(): (tuple(sorted(p.to_user_string() for p in g.get(k).parent_keys)),
                                 g.get(k).group_name, frozenset(g.get(k).kinds))
            for k in g.get_all_asset_keys()}


def write_component(folder: Path, type_name: str, attributes: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "defs.yaml").write_text(yaml.safe_dump({"type": type_name, "attributes": attributes}, sort_keys=False))


def test_component_and_builder_give_the_same_asset_graph():
    inline = yaml.safe_load(DEMO.read_text())
    with create_defs_folder_sandbox() as sb:
        write_component(sb.defs_folder_path / "demo", "pipelines.component.MergelinePipeline", inline)
        shutil.copytree(DEMO.parent / "tasks", sb.defs_folder_path / "demo" / "tasks")  # the evals' task files
        (sb.defs_folder_path / "soup").mkdir()
        (sb.defs_folder_path / "soup" / "pipeline.yaml").write_text(SOUP.read_text())
        (sb.defs_folder_path / "soup" / "defs.yaml").write_text(yaml.safe_dump(
            {"type": "pipelines.component.MergelinePipeline", "attributes": {"pipeline_file": "pipeline.yaml"}}))
        write_component(sb.defs_folder_path / "resources", "pipelines.component.MergelineResources",
                        {"store_root": "/tmp/mergeline-component-store", "device": "cpu",
                         "launcher": {"mode": "subprocess"}})
        with sb.build_all_defs() as comp_defs:
            comp = graph_of(comp_defs)
            comp_versions = {k.to_user_string(): comp_defs.resolve_asset_graph().get(k).code_version
                             for k in comp_defs.resolve_asset_graph().get_all_asset_keys()}
            assert sorted(comp_defs.resources) == ["evaluator", "gpu", "hub", "launcher", "model_store", "trainer"]
            assert comp_defs.resources["launcher"].mode == "subprocess"
            assert comp_defs.resources["model_store"].root == "/tmp/mergeline-component-store"
            assert comp_defs.resolve_schedule_def("demo__nightly_schedule").cron_schedule == "0 3 * * *"
    builder = {**graph_of(build_definitions(DEMO)), **graph_of(build_definitions(SOUP))}
    assert comp == builder
    b_versions = {}
    for path in (DEMO, SOUP):
        g = build_definitions(path).resolve_asset_graph()
        b_versions.update({k.to_user_string(): g.get(k).code_version for k in g.get_all_asset_keys()})
    assert comp_versions == b_versions


def test_code_version_attribute_stays_a_string():
    """Dagster's Jinja templating turns "2" into 2; the resolver keeps code versions strings."""
    with create_defs_folder_sandbox() as sb:
        d = sb.defs_folder_path / "p"
        d.mkdir()
        (d / "pipeline.yaml").write_text(DEMO.read_text())
        shutil.copytree(DEMO.parent / "tasks", d / "tasks")
        (d / "defs.yaml").write_text('type: pipelines.component.MergelinePipeline\nattributes:\n'
                                     '  pipeline_file: pipeline.yaml\n  code_version: "2"\n')
        write_component(sb.defs_folder_path / "r", "pipelines.component.MergelineResources", {})
        with sb.load_component_and_build_defs(defs_path=d) as (component, defs):
            assert isinstance(component, MergelinePipeline)
            assert component.code_version == "2"
        with sb.build_all_defs() as defs:
            g = defs.resolve_asset_graph()
            versions = {g.get(k).code_version for k in g.get_all_asset_keys()}
            assert all(v.startswith("2-1-") for v in versions), versions  # component "2", pipeline "1"


def test_invalid_inline_pipeline_reports_yaml_paths():
    bad = yaml.safe_load(DEMO.read_text())
    bad["merges"]["math_reverse"]["models"][1]["model"] = "revrse_skill"
    with create_defs_folder_sandbox() as sb:
        write_component(sb.defs_folder_path / "demo", "pipelines.component.MergelinePipeline", bad)
        write_component(sb.defs_folder_path / "r", "pipelines.component.MergelineResources", {})
        with pytest.raises(Exception) as ei:
            with sb.build_all_defs():
                pass
    text = "".join(str(x) for x in (ei.value, ei.value.__cause__, getattr(ei.value, "__context__", None)))
    assert "merges.math_reverse.models[1].model: no base model, adapter, fine-tune or merge named 'revrse_skill' " \
           "(did you mean 'reverse_skill'?)" in text


def test_registered_through_the_dg_entry_point():
    eps = importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")
    ours = [e for e in eps if e.value == "pipelines.component"]
    assert ours, "pip install -e . registers the entry point"
    mod = ours[0].load()
    assert mod.MergelinePipeline is MergelinePipeline and mod.MergelineResources is MergelineResources
    from dagster.components.core.package_entry import discover_entry_point_package_objects

    names = {k.to_typename() for k in discover_entry_point_package_objects()}
    assert {"pipelines.component.MergelinePipeline", "pipelines.component.MergelineResources"} <= names
