"""Error types of the merge engine.

Every error raised for bad input is a :class:`MergeError` subclass whose message names the file, model, tensor or
config key involved and says what to do, so the CLI can print it verbatim and exit non-zero without a traceback.
"""

from __future__ import annotations


class MergeError(Exception):
    """Base class of all errors the engine raises on purpose (bad input, unsupported feature)."""


class ConfigError(MergeError):
    """The merge config (YAML or API arguments) is invalid. Raised before any tensor is read."""


class InputError(MergeError):
    """An input checkpoint or adapter is missing, unreadable, unsafe or incompatible with the others."""


class UnsupportedError(MergeError):
    """The input is valid but uses a feature the engine does not implement; the message says which."""
