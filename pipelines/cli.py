"""The ``mergeline`` command line.

``mergeline merge CONFIG.yml OUTPUT_DIR`` runs a MergeKit-style config; ``mergeline merge-lora BASE ADAPTER OUTPUT``
merges a PEFT adapter into its base. Errors print one clear message (no traceback) and exit with status 2 for bad
input, 1 for anything unexpected, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _progress_bar(enabled: bool):
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = {"b": None}

    def update(done: int, total: int) -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, unit="tensor", desc="merging", file=sys.stderr, leave=False)
        bar["b"].n = done
        bar["b"].refresh()

    def close() -> None:
        if bar["b"] is not None:
            bar["b"].close()

    return update, close


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--shard-size", default="5GB", help="maximum bytes per output shard (default 5GB)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickled .bin/.pt weights (loaded with torch.load(weights_only=True))")
    p.add_argument("--download", action="store_true", help="allow downloading Hub repos not in the local cache")
    p.add_argument("--compute-dtype", choices=["float32", "float64"], default=None,
                   help="precision of the arithmetic (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--fsync", action="store_true", help="fsync the output shards before publishing (slower, durable)")
    p.add_argument("--check-finite", action="store_true",
                   help="fail (writing nothing) if any output tensor holds NaN/inf values; costs one extra pass over "
                        "the output bytes in the writer thread")
    p.add_argument("--out-quant", choices=["nf4", "fp4"], default=None,
                   help="write the result as a bitsandbytes 4-bit checkpoint (needs bitsandbytes)")


def _options(args: argparse.Namespace):
    from merge_ops.api import MergeOptions

    return MergeOptions(device=args.device, seed=getattr(args, "seed", 0), shard_size=args.shard_size,
                        allow_pickle=args.allow_pickle, download=args.download, compute_dtype=args.compute_dtype,
                        fsync=args.fsync, out_quant=getattr(args, "out_quant", None),
                        check_finite=getattr(args, "check_finite", False))


_SHORT_LIVED = False  # set by entry(): this process runs one command and exits


def _warm_up() -> None:
    """In the console script only: numba's registries without importing scipy.linalg (see
    :func:`merge_ops.kernels.warm_up_hiding_scipy`; 0.2–0.4 s of a few-second merge)."""
    if _SHORT_LIVED:
        from merge_ops.kernels import warm_up_hiding_scipy

        warm_up_hiding_scipy()


def cmd_merge(args: argparse.Namespace) -> int:
    from merge_ops.api import merge, plan_merge

    opts = _options(args)
    if args.dry_run:
        plan = plan_merge(args.config, opts)
        copies = sum(1 for t in plan.tensors if t.task is None)
        print(f"ok: {len(plan.tensors)} output tensors ({copies} copied, {len(plan.tensors) - copies} merged with "
              f"'{plan.config.merge_method}'), {plan.total_bytes / 1e9:.2f} GB, inputs: "
              + ", ".join(s.label for s in plan.sources))
        for w in plan.warnings:
            print(f"warning: {w}")
        return 0
    _warm_up()
    update, close = _progress_bar(sys.stderr.isatty() and not args.no_progress)
    try:
        result = merge(args.config, args.output_dir, opts, progress=update)
    finally:
        close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(result.summary())
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from merge_ops.api import merge_lora

    _warm_up()
    update, close = _progress_bar(sys.stderr.isatty() and not args.no_progress)
    try:
        result = merge_lora(args.base, args.adapter, args.output_dir, _options(args), progress=update,
                            out_dtype=args.dtype)
    finally:
        close()
    print(result.summary())
    return 0


def cmd_export_bnb(args: argparse.Namespace) -> int:
    """Quantize a safetensors checkpoint to a bitsandbytes 4-bit checkpoint (loads with from_pretrained)."""
    from merge_ops.bnb_export import export_bnb

    update, close = _progress_bar(sys.stderr.isatty() and not args.no_progress)
    try:
        result = export_bnb(args.model_dir, args.output_dir, args.quant, double_quant=args.double_quant,
                            compute_dtype=args.compute_dtype, blocksize=args.blocksize, shard_size=args.shard_size,
                            skip_modules=args.skip_module or [], progress=update)
    finally:
        close()
    for n in result.notes:
        print(f"note: {n}", file=sys.stderr)
    print(result.summary())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from merge_ops.methods import REGISTRY

    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        params = ", ".join(f"{p.name}{'*' if p.required else ''}" for p in cls.params)
        print(f"{name:18s} base={cls.base:9s} {cls.doc}  [{params}]")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate pipeline files without Dagster: all errors with their YAML paths (exit 2), or a summary (exit 0)."""
    from pipelines.spec import PipelineSpecError, load_pipeline, pipeline_outline

    status = 0
    for path in args.pipeline:
        try:
            spec = load_pipeline(path)
        except PipelineSpecError as e:
            print(f"mergeline: {e.source}: {len(e.errors)} error(s)", file=sys.stderr)
            for msg in e.errors:
                print(f"  {msg}", file=sys.stderr)
            status = 2
            continue
        print(f"{path}: ok: {spec.summary()}")
        if not args.quiet:
            for line in pipeline_outline(spec):
                print(f"  {line}")
        for w in spec.warnings:
            print(f"  warning: {w}")
    return status


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from merge_ops.gguf_export import export_gguf

    update, close = _progress_bar(sys.stderr.isatty() and not args.no_progress)
    try:
        result = export_gguf(args.model_dir, args.out_file, args.quant, progress=update)
    finally:
        close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeline", description="Streaming LLM merges (MergeKit configs, LoRA).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge models as a MergeKit-style YAML config says")
    p.add_argument("config", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare_*, della*)")
    p.add_argument("--dry-run", action="store_true", help="validate and plan, write nothing")
    _add_run_options(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("merge-lora", help="merge a PEFT LoRA adapter into its base model")
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="output dtype (default: the base's)")
    _add_run_options(p)
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("export-bnb", help="quantize a model to a bitsandbytes 4-bit (NF4/FP4) HF checkpoint")
    p.add_argument("model_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--quant", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--double-quant", action="store_true", help="also quantize the absmax statistics")
    p.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="bnb_4bit_compute_dtype written to the config (default: the model's dtype)")
    p.add_argument("--blocksize", type=int, default=64, choices=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--skip-module", action="append", help="keep this module unquantized (repeatable)")
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export_bnb)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("validate", help="check pipeline YAML files (names, cycles, methods, architectures, ...)")
    p.add_argument("pipeline", type=Path, nargs="+")
    p.add_argument("-q", "--quiet", action="store_true", help="only the one-line summary per file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export-gguf", help="export a safetensors model directory to one GGUF file (llama.cpp)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_file", type=Path)
    p.add_argument("--quant", default="q8_0",
                   help="f32, f16, bf16, q8_0 (default), q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k "
                        "(in-process); q2_k, q3_k_s/m/l need the optional llama-cpp-python")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(func=cmd_export_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from merge_ops.errors import MergeError

    try:
        return args.func(args)
    except MergeError as e:
        print(f"mergeline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergeline: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MERGELINE_TRACEBACK"):
            raise
        return _report(e)


def _report(e: Exception) -> int:
    """One readable line for what did not raise a MergeError: an option model refusing a value (bad input, 2), the
    machine (OSError: disk full, a file vanishing mid-run, 1) or a bug (1; the traceback with MERGELINE_TRACEBACK=1)."""
    if type(e).__name__ == "ValidationError" and type(e).__module__.startswith("pydantic"):
        msgs = [f"{'.'.join(str(p) for p in err['loc']) or 'option'}: {err['msg']}" for err in e.errors()]
        print(f"mergeline: error: invalid option: {'; '.join(msgs)}", file=sys.stderr)
        return 2
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        print(f"mergeline: error: {e.strerror or e}{where}; no output was written", file=sys.stderr)
        return 1
    print(f"mergeline: internal error: {type(e).__name__}: {e}. No output was written. This is a bug; please "
          f"report it with the output of the same command run with MERGELINE_TRACEBACK=1", file=sys.stderr)
    return 1


def entry() -> None:
    """The ``mergeline`` console script: :func:`main`, then leave without the interpreter's teardown.

    Why: a merge loads numba's compiled kernels, and tearing those down (LLVM objects, module dictionaries) took
    0.2–0.3 s here — a tenth of a LoRA merge. By the time :func:`main` returns, every output is closed, hashed and
    renamed into place and every worker thread has finished, so after flushing stdio and logging nothing is lost.
    Tests call :func:`main` directly and keep normal interpreter behaviour."""
    global _SHORT_LIVED
    _SHORT_LIVED = True
    code = main()
    try:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stdout must not turn success into a traceback
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
