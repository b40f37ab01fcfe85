"""The demo's held-out eval data: deterministic, and disjoint from the demo's training sets.

``pipelines/examples/demo/tasks/`` ships lm-eval task YAMLs and the jsonl/txt files this module writes. Each skill is
measured twice, by generation (exact match of the greedy answer) and by multiple choice (does the model rank the right
answer above three plausible wrong ones), plus a perplexity task over held-out skill text. Every held-out prompt is
absent from the training sets the demo's fine-tunes see (``generate(kind, 400, seed)`` with the seeds in
``pipeline.yaml``), so a score measures the skill, not memorised lines.

    python -m pipelines.demo_tasks            # rewrite the files (they are committed; a test checks they match)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Iterator

from assets.toy_data import generate

TASK_DIR = Path(__file__).resolve().parent / "examples" / "demo" / "tasks"
#: (kind, n, seed) of the demo's training datasets: held-out prompts must avoid all of these
TRAINING_SETS = (("arithmetic", 400, 1), ("reverse", 400, 2))
HELD_OUT_SEED = 2024
N_GENERATE = 40
N_CHOICE = 40
N_PPL_PARAGRAPHS = 12


def training_prompts() -> set[str]:
    return {r["prompt"] for kind, n, seed in TRAINING_SETS for r in generate(kind, n, seed)}


def held_out(kind: str, n: int, salt: str) -> list[dict[str, str]]:
    """``n`` distinct records of ``kind`` whose prompts no training set contains."""
    seen = training_prompts()
    out: list[dict[str, str]] = []
    for rec in generate(kind, 100_000, HELD_OUT_SEED + sum(map(ord, salt))):
        if rec["prompt"] in seen:
            continue
        seen.add(rec["prompt"])
        out.append(rec)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not find {n} held-out {kind} records")


def _arith_choices(rec: dict[str, str], rng: random.Random) -> list[str]:
    ans = int(rec["completion"])
    wrong: list[int] = []
    for d in rng.sample([-10, -2, -1, 1, 2, 10, 11, -11], 8):
        if ans + d >= 0 and ans + d not in wrong:
            wrong.append(ans + d)
        if len(wrong) == 3:
            break
    return [str(ans)] + [str(w) for w in wrong]


def _reverse_choices(rec: dict[str, str], rng: random.Random) -> list[str]:
    rev = rec["completion"].strip()
    word = rev[::-1]
    pool = [word, rev[1:] + rev[0], "".join(rng.sample(rev, len(rev)))]
    out = [rev]
    for w in pool:
        while w in out:
            w = "".join(rng.sample(rev, len(rev))) + rng.choice("abcdefghijklmnopqrstuvwxyz")
        out.append(w)
    return [" " + w for w in out]


def choice_records(kind: str, n: int) -> list[dict]:
    """Multiple-choice records: ``choices`` (the right answer at ``label``, others shuffled around it)."""
    rng = random.Random(f"choices:{kind}")
    recs = []
    for rec in held_out(kind, n, f"choice-{kind}"):
        choices = (_arith_choices if kind == "arithmetic" else _reverse_choices)(rec, rng)
        right = choices[0]
        rng.shuffle(choices)
        recs.append({"prompt": rec["prompt"], "choices": choices, "label": choices.index(right)})
    return recs


def perplexity_text() -> str:
    """Paragraphs of held-out skill lines, both skills interleaved (one lm-eval document per paragraph)."""
    arith = held_out("arithmetic", N_PPL_PARAGRAPHS * 3, "ppl-arithmetic")
    rev = held_out("reverse", N_PPL_PARAGRAPHS * 3, "ppl-reverse")
    paras = []
    for i in range(N_PPL_PARAGRAPHS):
        lines = []
        for j in range(3):
            a, r = arith[i * 3 + j], rev[i * 3 + j]
            lines += [a["prompt"] + a["completion"], r["prompt"] + r["completion"]]
        paras.append("\n".join(lines))
    return "\n\n".join(paras) + "\n"


def files() -> Iterator[tuple[str, str]]:
    """(file name, content) of every data file the demo's task YAMLs read."""
    def jsonl(rows):
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)

    yield "arithmetic_heldout.jsonl", jsonl(held_out("arithmetic", N_GENERATE, "generate-arithmetic"))
    yield "reverse_heldout.jsonl", jsonl(held_out("reverse", N_GENERATE, "generate-reverse"))
    yield "arithmetic_choice.jsonl", jsonl(choice_records("arithmetic", N_CHOICE))
    yield "reverse_choice.jsonl", jsonl(choice_records("reverse", N_CHOICE))
    yield "skills_heldout.txt", perplexity_text()


def write(task_dir: Path = TASK_DIR) -> list[Path]:
    task_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in files():
        p = task_dir / name
        p.write_text(text)
        out.append(p)
    return out


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else TASK_DIR):
        print(p)
