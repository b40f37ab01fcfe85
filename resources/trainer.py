"""The trainer resource: which LoRA training backend to use and the default hyper-parameters. It hands the work to
``resources.training_backend.train_lora`` (transformers + PEFT, or Unsloth's FastLanguageModel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import dagster as dg
from pydantic import Field


class TrainerResource(dg.ConfigurableResource):
    backend: Literal["auto", "unsloth", "peft"] = Field(
        "auto", description="auto: Unsloth when CUDA is available and unsloth is installed, else transformers+PEFT")
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    epochs: float = 1
    max_steps: int | None = None
    learning_rate: float = 2e-4
    batch_size: int = 4
    max_seq_len: int = 128
    seed: int = 0
    load_in_4bit: bool = False

    def train_config(self, overrides: dict[str, Any]):
        """A ``LoraTrainConfig`` from this resource's defaults and a fine-tune's YAML overrides (YAML wins)."""
        from resources.training_backend import LoraTrainConfig

        base = {k: getattr(self, k) for k in ("backend", "r", "alpha", "dropout", "target_modules", "epochs",
                                              "max_steps", "learning_rate", "batch_size", "max_seq_len", "seed",
                                              "load_in_4bit")}
        base.update(overrides)
        known = set(LoraTrainConfig.model_fields)
        return LoraTrainConfig(**{k: v for k, v in base.items() if k in known})

    def train(self, base_dir: Path, dataset_files: list[Path], overrides: dict[str, Any], out_dir: Path, *,
              device: str = "auto", log: Callable[[str], None] | None = None):
        """Train; returns ``(LoraTrainConfig, TrainResult)``. The adapter lands in ``out_dir`` (written atomically
        by the backend)."""
        from resources.training_backend import train_lora

        cfg = self.train_config(overrides)
        return cfg, train_lora(Path(base_dir), [Path(f) for f in dataset_files], cfg, Path(out_dir), device=device,
                               log=log)
