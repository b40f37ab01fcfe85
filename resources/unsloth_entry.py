"""Subprocess entry point of mergeline's Unsloth fine-tune backend.

    python resources/unsloth_entry.py ARGS_JSON          # how training_backend starts it (by path)
    python -m resources.unsloth_entry ARGS_JSON          # equivalent, from the repo root

``ARGS_JSON`` is a path to a JSON file (or an inline JSON object) with ``base_dir``, ``dataset_files``, ``cfg``
(a ``LoraTrainConfig`` dump), ``out_dir`` (the staging directory to write the adapter into), ``device``
(``auto`` | ``cpu`` | ``cuda``) and ``result_path`` (where the result JSON goes; ``{"error": {...}}`` on failure).

``import unsloth`` happens FIRST, before transformers / peft / trl are imported in this process (Unsloth patches
them on import); that is why this is a separate process: the caller may already have imported transformers.
``training_backend`` itself imports nothing heavy at module level. It is loaded by file path when this runs as a
script, so neither ``resources/__init__.py`` (which may import Dagster, absent from the Unsloth venv) nor the
``resources/`` folder on ``sys.path`` (whose module names could shadow installed packages) gets in the way.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def _load_backend():
    if __package__:
        from . import training_backend  # python -m resources.unsloth_entry

        return training_backend
    import importlib.util

    here = Path(__file__).resolve().parent
    # running as a script put resources/ first on sys.path: drop it so e.g. a resources/datasets.py cannot
    # shadow the `datasets` package that trl imports
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    name = "mergeline_training_backend"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, here / "training_backend.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _read_args(arg: str) -> dict:
    s = arg.strip()
    if s.startswith("{"):
        return json.loads(s)
    return json.loads(Path(s).read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m resources.unsloth_entry ARGS_JSON", file=sys.stderr)
        return 2
    args = _read_args(argv[0])
    result_path = Path(args["result_path"]) if args.get("result_path") else None

    def finish(payload: dict) -> None:
        if result_path is not None:
            tmp = result_path.with_name(result_path.name + ".part")
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, result_path)

    try:
        if args.get("device") == "cpu":
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
            os.environ.setdefault("UNSLOTH_FORCE_CPU", "1")
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        for mod in ("transformers", "peft", "trl"):
            if mod in sys.modules:  # cannot happen from the CLI; guards in-process misuse
                raise RuntimeError(f"{mod} was imported before unsloth; run this module in a fresh process")
        import unsloth  # noqa: F401  -- MUST precede transformers / peft / trl

        backend = _load_backend()
        result = backend._train_unsloth_in_process(args, emit=lambda s: print(s, flush=True))
    except BaseException as e:  # report to the parent, then fail
        traceback.print_exc()
        finish({"error": {"type": type(e).__name__, "message": str(e)}})
        return 1
    finish({"losses": result["losses"], "final_loss": result["final_loss"], "num_examples": result["num_examples"],
            "metrics": result["metrics"]})
    print(f"unsloth_entry: wrote adapter to {args['out_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
