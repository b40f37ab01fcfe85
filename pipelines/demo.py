"""The README's main job (until the Dagster demo lands): a merge demo on locally generated models.

It builds a small Llama base and tokenizer (no download), two "fine-tunes" (the base plus seeded noise) and a real
PEFT LoRA adapter, then runs the engine the way a user would: a TIES merge of the two fine-tunes and base+adapter,
and a LoRA-into-base merge, loads both results with transformers and checks the LoRA merge against PEFT's own
``merge_and_unload``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import yaml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("demo_output"))
    args = ap.parse_args(argv)
    from merge_ops.api import MergeOptions, merge, merge_lora
    from pipelines.toy_models import save_lora_adapter, save_tiny_llama, save_variant

    work = args.workdir.absolute()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    base = save_tiny_llama(work / "models/base", seed=0, dtype=torch.bfloat16, num_layers=4, hidden=128, vocab=256)
    ft_a = save_variant(base, work / "models/ft_math", seed=1, scale=0.05)
    ft_b = save_variant(base, work / "models/ft_code", seed=2, scale=0.05)
    lora = save_lora_adapter(base, work / "adapters/lora_chat", seed=3, r=8, alpha=16)
    print(f"built base, 2 fine-tunes and a LoRA adapter in {time.perf_counter() - t0:.1f} s under {work}")

    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft_a), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(ft_b), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": f"{base}+{lora}", "parameters": {"weight": 0.3, "density": [0.3, 0.7]}},
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    cfg_path = work / "ties.yml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    res = merge(cfg_path, work / "merged/ties", MergeOptions(device="auto"))
    print("ties:", res.summary())
    res2 = merge_lora(base, lora, work / "merged/lora_into_base", MergeOptions(device="auto"), out_dtype="float32")
    print("lora:", res2.summary())

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(work / "merged/ties"))
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(str(work / "merged/ties"))
    out = merged.generate(ids, max_new_tokens=8, do_sample=False)
    print("ties model generates:", repr(tok.decode(out[0][ids.shape[1]:])))

    ours = AutoModelForCausalLM.from_pretrained(str(work / "merged/lora_into_base"), dtype=torch.float32)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                    str(lora)).merge_and_unload()
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    print(f"LoRA merge (float32 output) vs PEFT merge_and_unload: max |logit diff| = {diff:.2e}")
    print(f"demo done in {time.perf_counter() - t0:.1f} s; outputs under {work / 'merged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
