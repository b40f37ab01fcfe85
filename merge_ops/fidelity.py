"""How close an exported (quantized) model stays to the unquantized one: logits on a fixed prompt set.

Figures, over every token position of every prompt: ``max_abs_logit_diff`` and ``mean_abs_logit_diff`` (over all
vocabulary entries) between the candidate's and the reference's next-token logits, and ``top1_agreement``, the
fraction of positions where both predict the same next token. The reference is loaded in float32, so the figures
measure the export's error, not the reference's own rounding.

Unlike the exporters this loads whole models (reference and candidate, one after the other: the reference logits
are kept, the reference model is freed before the candidate loads), so it is meant for models that fit in memory.
torch and transformers are imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import InputError

#: Fixed default prompts: short, varied (prose, code, arithmetic, a question, a list), tokenizer-agnostic.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Question: what is two plus two? Answer:",
    "One, two, three, four, five, six, seven,",
    "Merging fine-tuned language models with task arithmetic",
    "The capital of France is",
    "for i in range(10): print(i * i)",
    "In a hole in the ground there lived a",
)

CandidateLoader = Callable[[], Any]


def hf_loader(path: str | Path, **kw: Any) -> CandidateLoader:
    """A Hugging Face model directory (plain or bnb 4-bit pre-quantized: its ``quantization_config`` is honoured)."""
    def load():
        import torch
        from transformers import AutoModelForCausalLM

        opts = {"device_map": "cpu", "trust_remote_code": False, **kw}
        if "quantization_config" not in _read_config(Path(path)):
            opts.setdefault("dtype", torch.float32)
        return AutoModelForCausalLM.from_pretrained(str(path), **opts)

    return load


def gguf_loader(gguf_file: str | Path) -> CandidateLoader:
    """A GGUF file, loaded by transformers (``from_pretrained(dir, gguf_file=name)``, dequantized to float32)."""
    def load():
        import torch
        from transformers import AutoModelForCausalLM

        p = Path(gguf_file)
        if not p.is_file():
            raise InputError(f"GGUF file '{p}' does not exist")
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                    trust_remote_code=False)

    return load


def _read_config(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _logits(model, encoded: list[Any]) -> list[Any]:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for ids in encoded:
            out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def logit_fidelity(reference_dir: str | Path, candidate_loader: CandidateLoader,
                   prompts: Sequence[str] | None = None, tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    """Compare the candidate's logits with the float32 reference's on ``prompts`` (default :data:`DEFAULT_PROMPTS`).

    Returns ``{max_abs_logit_diff, mean_abs_logit_diff, top1_agreement, prompts, positions}``."""
    import torch
    from transformers import AutoTokenizer

    prompts = list(prompts or DEFAULT_PROMPTS)
    if not prompts:
        raise InputError("logit_fidelity: the prompt list is empty")
    tok_dir = Path(tokenizer_dir or reference_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    except Exception as e:
        raise InputError(f"{tok_dir}: cannot load a tokenizer for the fidelity check ({type(e).__name__}: {e})") from e
    encoded = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise InputError(f"logit_fidelity: prompt {p!r} encodes to no tokens")
        encoded.append(ids)
    ref_model = hf_loader(reference_dir)()
    ref = _logits(ref_model, encoded)
    del ref_model
    gc.collect()
    cand_model = candidate_loader()
    cand = _logits(cand_model, encoded)
    del cand_model
    gc.collect()
    max_d, sum_d, n_el, agree, positions = 0.0, 0.0, 0, 0, 0
    for r, c in zip(ref, cand):
        if r.shape != c.shape:
            raise InputError(f"logit_fidelity: candidate logits have shape {list(c.shape)}, the reference's "
                             f"{list(r.shape)} (different vocabulary?)")
        d = (r - c).abs()
        max_d = max(max_d, float(d.max()))
        sum_d += float(d.double().sum())
        n_el += d.numel()
        agree += int((r.argmax(-1) == c.argmax(-1)).sum())
        positions += r.shape[0]
    if not all(torch.isfinite(c).all() for c in cand):
        raise InputError("logit_fidelity: the candidate produced non-finite logits")
    return {
        "max_abs_logit_diff": max_d,
        "mean_abs_logit_diff": sum_d / n_el,
        "top1_agreement": agree / positions,
        "prompts": len(prompts),
        "positions": positions,
    }
