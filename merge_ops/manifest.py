"""The output's machine-readable manifest (``mergeline.json``) and human-readable model card (``README.md``)."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

LIBS = ("mergeline", "torch", "safetensors", "numpy", "pydantic", "transformers", "peft", "huggingface_hub")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    (out_dir / "mergeline.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def model_card(base_models: list[str], relation: str, config_yaml: str, summary: str, tags: list[str] | None = None,
               extra: str = "") -> str:
    front = {
        "base_model": base_models,
        "base_model_relation": relation,
        "library_name": "transformers",
        "tags": ["merge", "mergeline"] + [t for t in (tags or []) if t not in ("merge", "mergeline")],
    }
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        + f"# Merged model\n\n{summary}\n\n"
        + "Made with [mergeline](https://pypi.org/project/mergeline/).\n\n"
        + "## Configuration\n\n```yaml\n" + config_yaml.rstrip() + "\n```\n" + extra
    )
