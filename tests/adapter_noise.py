"""Seeded noise on a saved PEFT adapter, shared by the PEFT-parity tests.

Why: PEFT initialises B to zeros (and DoRA magnitudes to the base's norms), so an unperturbed adapter merges to the
base and hides bugs; with noise on every saved tensor nothing can equal an init value or the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def perturb_adapter(adapter_dir: Path, seed: int = 0, keep_dtype: bool = False) -> None:
    """Add seeded noise to every saved tensor: B/magnitude/bias/replacements then differ from any init value.
    The noisy tensors are saved as float32, or in each tensor's own dtype with ``keep_dtype``."""
    f = adapter_dir / "adapter_model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(sd):
        v = sd[k].float()
        noise = torch.randn(v.shape, generator=g)
        if "lora_magnitude_vector" in k:
            v = v * (1 + 0.1 * noise)  # stays positive
        else:
            v = v + 0.1 * (v.abs().mean() + 1e-2) * noise
        out[k] = (v.to(sd[k].dtype) if keep_dtype else v).contiguous()
    save_file(out, str(f), metadata={"format": "pt"})
