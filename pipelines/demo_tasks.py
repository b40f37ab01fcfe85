"""The demo's held-out eval data: deterministic, and disjoint from the demo's training sets.

``pipelines/examples/demo/tasks/`` ships lm-eval task YAMLs and the jsonl/txt files this module writes. Each skill is
measured twice, by generation (exact match of the greedy answer) and by multiple choice (does the model rank the right
answer above three plausible wrong ones), plus a perplexity task over held-out skill text. Every held-out prompt is
absent from the training sets the demo's fine-tunes see (``generate(kind, 400, seed)`` with the seeds in
``pipeline.yaml``), so a score measures the skill, not memorised lines: the three-letter reversals are fresh words,
and the sums are the 20 single-digit pairs ``add_digits`` never generates (``assets.toy_data.add_digits_held_out``).

    python -m pipelines.demo_tasks            # rewrite the files (they are committed; a test checks they match)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Iterator

from assets.toy_data import add_digits_held_out, generate

TASK_DIR = Path(__file__).resolve().parent / "examples" / "demo" / "tasks"
#: (kind, n, seed) of the demo's training datasets: held-out prompts must avoid all of these
TRAINING_SETS = (("add_digits", 400, 1), ("reverse_letters", 400, 2))
HELD_OUT_SEED = 2024
N_GENERATE = 40
N_CHOICE = 40
N_SUMS = 20  # every held-out single-digit sum once
N_PPL_PARAGRAPHS = 12


def training_prompts() -> set[str]:
    return {r["prompt"] for kind, n, seed in TRAINING_SETS for r in generate(kind, n, seed)}


def held_out_sums(salt: str) -> list[dict[str, str]]:
    """The 20 single-digit sums ``add_digits`` never trains on (its generator skips them), in a seeded order.

    Single-digit addition has only 100 facts, so held-out items cannot be found by sampling: the generator keeps a
    fixed fifth of the table out of every training set and the evals ask exactly that fifth."""
    recs = [{"prompt": f"calc: {a}+{b}=", "completion": f"{a + b}"}
            for a in range(10) for b in range(10) if add_digits_held_out(a, b)]
    random.Random(f"{HELD_OUT_SEED}:{salt}").shuffle(recs)
    return recs


def held_out(kind: str, n: int, salt: str) -> list[dict[str, str]]:
    """``n`` distinct records of ``kind`` whose prompts no training set contains (``add_digits``: at most the 20
    held-out sums, repeated in a different order when ``n`` > 20)."""
    seen = training_prompts()
    if kind == "add_digits":
        sums = held_out_sums(salt)
        out = (sums * (1 + n // len(sums)))[:n]
        if {r["prompt"] for r in out} & seen:
            raise RuntimeError("a held-out sum is in a training set")
        return out
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
    """The sum and three near misses inside the range of single-digit sums (0..18), so no wrong answer is
    ruled out just by being a number the skill never produces."""
    ans = int(rec["completion"])
    wrong = [w for w in (ans + d for d in rng.sample([-3, -2, -1, 1, 2, 3], 6)) if 0 <= w <= 18][:3]
    return [str(ans)] + [str(w) for w in wrong]


def _reverse_choices(rec: dict[str, str], rng: random.Random) -> list[str]:
    """The reversed letters vs the letters as given, a rotation of the right answer and a shuffle (all distinct;
    a fresh letter replaces one when the word's letters repeat)."""
    rev = rec["completion"].split()
    pool = [rev[::-1], rev[1:] + rev[:1], rng.sample(rev, len(rev))]
    out = [rev]
    for w in pool:
        while w in out:
            w = rng.sample(rev, len(rev))
            w[rng.randrange(len(w))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        out.append(w)
    return [" " + " ".join(w) for w in out]


def choice_records(kind: str, n: int) -> list[dict]:
    """Multiple-choice records: ``choices`` (the right answer at ``label``, others shuffled around it)."""
    rng = random.Random(f"choices:{kind}")
    recs = []
    for rec in held_out(kind, n, f"choice-{kind}"):
        choices = (_arith_choices if kind == "add_digits" else _reverse_choices)(rec, rng)
        right = choices[0]
        rng.shuffle(choices)
        recs.append({"prompt": rec["prompt"], "choices": choices, "label": choices.index(right)})
    return recs


def perplexity_text() -> str:
    """Paragraphs of held-out skill lines, both skills interleaved (one lm-eval document per paragraph)."""
    arith = held_out("add_digits", N_PPL_PARAGRAPHS * 3, "ppl-arithmetic")
    rev = held_out("reverse_letters", N_PPL_PARAGRAPHS * 3, "ppl-reverse")
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

    yield "arithmetic_heldout.jsonl", jsonl(held_out("add_digits", N_SUMS, "generate-arithmetic"))
    yield "reverse_heldout.jsonl", jsonl(held_out("reverse_letters", N_GENERATE, "generate-reverse"))
    yield "arithmetic_choice.jsonl", jsonl(choice_records("add_digits", N_SUMS))
    yield "reverse_choice.jsonl", jsonl(choice_records("reverse_letters", N_CHOICE))
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
