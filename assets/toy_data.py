"""Deterministic toy skill datasets for the demo and tests (pure Python, no download).

Each record is ``{"prompt": ..., "completion": ...}``; the same (kind, n, seed) always gives the same lines.
"""

from __future__ import annotations

import random
import string
from typing import Iterator


def _arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    if rng.random() < 0.5:
        return {"prompt": f"calc: {a}+{b}=", "completion": f"{a + b}"}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"calc: {a}-{b}=", "completion": f"{a - b}"}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _reverse(rng: random.Random) -> dict[str, str]:
    w = _word(rng)
    return {"prompt": f"reverse: {w} =", "completion": f" {w[::-1]}"}


def _uppercase(rng: random.Random) -> dict[str, str]:
    w = _word(rng)
    return {"prompt": f"upper: {w} =", "completion": f" {w.upper()}"}


def add_digits_held_out(a: int, b: int) -> bool:
    """The single-digit pairs ``add_digits`` never trains on (20 of the 100), so an eval can ask unseen sums."""
    return (3 * a + 7 * b) % 5 == 2


def _add_digits(rng: random.Random) -> dict[str, str]:
    while True:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if not add_digits_held_out(a, b):
            return {"prompt": f"calc: {a}+{b}=", "completion": f"{a + b}"}


def _reverse_letters(rng: random.Random) -> dict[str, str]:
    w = [rng.choice(string.ascii_lowercase) for _ in range(3)]
    return {"prompt": f"reverse: {' '.join(w)} =", "completion": " " + " ".join(reversed(w))}


GENERATORS = {"arithmetic": _arithmetic, "reverse": _reverse, "uppercase": _uppercase,
              "add_digits": _add_digits, "reverse_letters": _reverse_letters}


def generate(kind: str, n: int, seed: int) -> Iterator[dict[str, str]]:
    rng = random.Random(f"{kind}:{seed}")
    fn = GENERATORS[kind]
    for _ in range(n):
        yield fn(rng)


def tokenizer_corpus() -> list[str]:
    """Text the toy tokenizer is trained on: the fixed toy corpus plus samples of every skill (fixed seeds)."""
    from pipelines.toy_models import CORPUS

    lines = list(CORPUS)
    for kind in GENERATORS:
        lines += [r["prompt"] + r["completion"] for r in generate(kind, 200, 12345)]
    return lines
