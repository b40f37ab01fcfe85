"""The lm-eval backend on tiny local models: its numbers equal a direct ``lm_eval.simple_evaluate`` call on the same
model (multiple choice, generate_until, perplexity), perplexity and multiple-choice accuracy equal a hand-written
torch oracle, an adapter parent is exactly base + LoRA, and bad input fails before any model is loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import demo_tasks
from resources.eval_backend import (
    EvalError,
    EvalOptions,
    EvalTask,
    evaluate,
    flatten_results,
    prepare_tasks,
    read_documents,
)

DEMO_TASKS = demo_tasks.TASK_DIR


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """The demo's toy base (hidden 32; its tokenizer covers printable ASCII) and a non-trivial LoRA adapter on it."""
    from assets.base_models import build_toy_model
    from pipelines.spec import BaseModelSpec
    from pipelines.toy_models import save_lora_adapter

    root = tmp_path_factory.mktemp("evalmodels")
    base = root / "base"
    build_toy_model(BaseModelSpec(toy={"seed": 0, "num_layers": 2, "hidden": 32, "vocab": 256}), base, "toy")
    lora = save_lora_adapter(base, root / "lora", seed=3, r=4, alpha=16)
    return {"base": base, "lora": lora}


def _direct(model, tok, tasks: list[str], include: Path, *, batch_size: int, limit: int | None = None,
            add_bos_token: bool | None = None) -> dict:
    """What a user would write by hand: HFLM on the model object, a TaskManager over the folder, simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, add_bos_token=add_bos_token)
    tm = TaskManager(include_path=str(include), include_defaults=False)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, bootstrap_iters=0, log_samples=False)


def _load(path: Path, add_bos_token: bool | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path), **kw)


def test_demo_tasks_match_a_direct_simple_evaluate(toy, tmp_path, monkeypatch):
    """The shipped demo tasks (generate_until + multiple choice, data next to the YAMLs) and a perplexity task, run
    from an unrelated working directory, give exactly what simple_evaluate gives on copies of the YAMLs with absolute
    data paths."""
    abs_dir = tmp_path / "abs_tasks"
    abs_dir.mkdir()
    names = ["arithmetic_exact_match", "reverse_exact_match", "arithmetic_choice", "reverse_choice"]
    for n in names:
        cfg = yaml.safe_load((DEMO_TASKS / f"{n}.yaml").read_text())
        cfg["dataset_kwargs"]["data_files"] = {k: str(DEMO_TASKS / v)
                                               for k, v in cfg["dataset_kwargs"]["data_files"].items()}
        (abs_dir / f"{n}.yaml").write_text(yaml.safe_dump(cfg))
    # an independently written perplexity task over the same documents
    docs = read_documents(DEMO_TASKS / "skills_heldout.txt")
    (abs_dir / "ppl.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (abs_dir / "ppl.yaml").write_text(yaml.safe_dump({
        "task": "skills_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(abs_dir / "ppl.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]}))

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative data_files must not depend on the working directory
    tasks = [EvalTask(n) for n in names] + [EvalTask("skills_ppl", text_file=DEMO_TASKS / "skills_heldout.txt")]
    opts = EvalOptions(batch_size=4, limit=12, add_bos_token=True)
    run = evaluate(toy["base"], tasks, opts, include=[DEMO_TASKS])

    model, tok = _load(toy["base"], add_bos_token=True)
    direct, _ = flatten_results(_direct(model, tok, names, abs_dir, batch_size=4, limit=12, add_bos_token=True))
    # perplexity: BOS comes from the rolling windows' prefix only (see the next test's oracle)
    direct.update(flatten_results(_direct(model, tok, ["skills_ppl"], abs_dir, batch_size=4, limit=12,
                                          add_bos_token=False))[0])
    assert set(run.scores) == set(direct) == set(names) | {"skills_ppl"}
    for task, metrics in direct.items():
        assert run.scores[task] == pytest.approx(metrics, rel=1e-9, abs=1e-12), task
    assert set(run.scores["arithmetic_choice"]) == {"acc"}
    assert set(run.scores["reverse_exact_match"]) == {"exact_match"}
    assert set(run.scores["skills_ppl"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert run.higher_is_better["skills_ppl"]["byte_perplexity"] is False
    assert run.higher_is_better["arithmetic_choice"]["acc"] is True
    assert run.samples["arithmetic_choice"] == 12 and run.samples["skills_ppl"] == 12


def _oracle_byte_perplexity(model, tok, docs: list[str]) -> float:
    """exp(-sum log p(doc) / bytes), each document scored after BOS in one forward pass (they are short)."""
    total_ll, total_bytes = 0.0, 0
    for d in docs:
        ids = [tok.bos_token_id] + tok.encode(d, add_special_tokens=False)
        assert len(ids) <= model.config.max_position_embeddings
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        total_ll += sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        total_bytes += len(d.encode())
    return math.exp(-total_ll / total_bytes)


def _oracle_mc_acc(model, tok, rows: list[dict]) -> float:
    """Accuracy of ranking the choices by the summed log-probability of their tokens after the prompt."""
    hits = 0
    for r in rows:
        ctx = tok.encode(r["prompt"], add_special_tokens=False)
        lls = []
        for c in r["choices"]:
            whole = tok.encode(r["prompt"] + c, add_special_tokens=False)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)))
        hits += int(max(range(len(lls)), key=lls.__getitem__) == r["label"])
    return hits / len(rows)


def test_perplexity_and_choice_accuracy_equal_a_torch_oracle(toy, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("calc: 3+4=7\nreverse: abc = cba\n\nthe quick brown fox\n\n\nreverse: dog = god\n")
    rows = [json.loads(x) for x in (DEMO_TASKS / "arithmetic_choice.jsonl").read_text().splitlines()[:8]]
    mc = tmp_path / "mc"
    mc.mkdir()
    (mc / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (mc / "mc.yaml").write_text(yaml.safe_dump({
        "task": "mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "data.jsonl"}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc"}]}))
    run = evaluate(toy["base"], [EvalTask("ppl", text_file=text), EvalTask("mc", path=mc / "mc.yaml")],
                   EvalOptions(batch_size=3))
    assert read_documents(text) == ["calc: 3+4=7\nreverse: abc = cba", "the quick brown fox", "reverse: dog = god"]
    model, tok = _load(toy["base"])
    want = _oracle_byte_perplexity(model, tok, read_documents(text))
    assert run.scores["ppl"]["byte_perplexity"] == pytest.approx(want, rel=1e-5)
    assert run.scores["ppl"]["bits_per_byte"] == pytest.approx(math.log2(want), rel=1e-5)
    assert run.scores["mc"]["acc"] == pytest.approx(_oracle_mc_acc(model, tok, rows), abs=1e-12)
    # with add_bos_token (a tokenizer that prepends BOS itself) a document is still scored after exactly one BOS
    bos_run = evaluate(toy["base"], [EvalTask("ppl", text_file=text)], EvalOptions(batch_size=3, add_bos_token=True))
    assert bos_run.scores["ppl"]["byte_perplexity"] == pytest.approx(want, rel=1e-5)


def test_adapter_parent_is_base_plus_lora(toy, tmp_path):
    """base + adapter (merged by the backend) scores what the unmerged PeftModel scores, and not what the base does."""
    from peft import PeftModel

    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"body": s}) + "\n" for s in ("calc: 12+7=19", "reverse: abc = cba",
                                                                     "one two three four")))
    task = [EvalTask("ppl", text_file=text, text_field="body")]
    with_lora = evaluate(toy["base"], task, EvalOptions(batch_size=2), adapter_dir=toy["lora"])
    base_only = evaluate(toy["base"], task, EvalOptions(batch_size=2))

    model, tok = _load(toy["base"])
    peft_model = PeftModel.from_pretrained(model, str(toy["lora"])).eval()
    want = _oracle_byte_perplexity(peft_model, tok, read_documents(text, "body"))
    assert with_lora.scores["ppl"]["byte_perplexity"] == pytest.approx(want, rel=1e-4)
    assert abs(base_only.scores["ppl"]["byte_perplexity"] - want) > 1e-3 * want


def test_bad_tasks_fail_before_any_model_is_loaded(tmp_path):
    missing_model = tmp_path / "no_model"  # never loaded: the task errors come first
    with pytest.raises(EvalError, match=r"'nope' not found in .*include_defaults: true"):
        evaluate(missing_model, [EvalTask("nope")], EvalOptions(), include=[DEMO_TASKS])
    with pytest.raises(EvalError, match="perplexity text file .*missing.txt' does not exist"):
        evaluate(missing_model, [EvalTask("p", text_file=tmp_path / "missing.txt")], EvalOptions())
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(EvalError, match="has no text"):
        prepare_tasks([EvalTask("p", text_file=tmp_path / "empty.txt")], tmp_path / "w")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: needs a string field 'text'"):
        prepare_tasks([EvalTask("p", text_file=bad)], tmp_path / "w")
    with pytest.raises(EvalError, match="task names must be unique: a"):
        prepare_tasks([EvalTask("a", text_file=bad), EvalTask("a", text_file=bad)], tmp_path / "w")
    with pytest.raises(EvalError, match="not a model directory"):
        evaluate(missing_model, [EvalTask("arithmetic_choice")], EvalOptions(), include=[DEMO_TASKS])


def test_demo_task_data_is_deterministic_and_held_out():
    """The shipped files are what the generator writes, and no held-out prompt is in a demo training set."""
    train = demo_tasks.training_prompts()
    # up to 80 distinct single-digit sums (the other 20 are held out) + ~400 three-letter reversals
    assert 70 <= len({p for p in train if p.startswith("calc: ")}) <= 80 and len(train) > 450
    for name, text in demo_tasks.files():
        assert (DEMO_TASKS / name).read_text() == text, f"{name} is stale: run python -m pipelines.demo_tasks"
    sizes = {"arithmetic_heldout.jsonl": 20, "reverse_heldout.jsonl": 40, "arithmetic_choice.jsonl": 20,
             "reverse_choice.jsonl": 40}
    for name, size in sizes.items():
        recs = [json.loads(x) for x in (DEMO_TASKS / name).read_text().splitlines()]
        assert len(recs) == size and len({r["prompt"] for r in recs}) == size, name
        assert not {r["prompt"] for r in recs} & train, name
        for r in recs:
            if "choices" in r:
                assert len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
    for line in (DEMO_TASKS / "skills_heldout.txt").read_text().split("\n"):
        if line:
            prompt = line.split("=")[0] + "="
            assert prompt not in train, line
    # the training set itself is what the demo pipeline trains on
    pipe = yaml.safe_load((DEMO_TASKS.parent / "pipeline.yaml").read_text())
    assert {(d["generated"]["kind"], d["generated"]["n"], d["generated"]["seed"])
            for d in pipe["datasets"].values()} == set(demo_tasks.TRAINING_SETS)
