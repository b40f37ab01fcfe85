"""Test-side name for the tiny model builders (they live in :mod:`pipelines.toy_models` so the demo can use them)."""

from pipelines.toy_models import (  # noqa: F401
    CORPUS,
    llama_config,
    load_state,
    save_tokenizer,
    save_tiny_llama,
    save_variant,
)
