"""The reference way to merge a LoRA adapter, timed as the baseline for `mergeline merge-lora`.

Loads the base in transformers (bf16), wraps it with ``PeftModel.from_pretrained``, ``merge_and_unload()``s, and
``save_pretrained``s the result as safetensors. Run it in bench/.venv-mergekit (made by setup_mergekit.sh):

    bench/.venv-mergekit/bin/python bench/peft_merge_baseline.py BASE_DIR ADAPTER_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-shard-size", default=None, help="passed to save_pretrained (default: transformers')")
    ap.add_argument("--copy-tokenizer", action="store_true", help="also load and save the base's tokenizer")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter()
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=dtype, low_cpu_mem_usage=True)
    t_load = time.perf_counter()
    model = PeftModel.from_pretrained(model, a.adapter)
    merged = model.merge_and_unload()
    t_merge = time.perf_counter()
    kw = {"max_shard_size": a.max_shard_size} if a.max_shard_size else {}
    merged.save_pretrained(a.out, **kw)
    if a.copy_tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(a.base).save_pretrained(a.out)
    t_save = time.perf_counter()
    print(f"[peft-baseline] import {t_import - t0:.1f} s, load {t_load - t_import:.1f} s, "
          f"adapter+merge {t_merge - t_load:.1f} s, save {t_save - t_merge:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
