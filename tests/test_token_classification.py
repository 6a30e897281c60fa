"""NER end to end on a tiny BERT: CoNLL reading and IOB repair, first-sub-token labels,
seqeval scores on hand-made cases, every strategy trained, reloaded and evaluated the same,
plain-peft loading, and predict's character offsets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SPECIAL, save_tiny_bert, write_recipe

from peftlab.cli import main
from peftlab.errors import PeftlabError

FIRST = ["john", "mary", "anna", "peter"]
LAST = ["smith", "jones", "brown", "jackson"]  # jackson: jack + ##son, two sub-tokens
PLACES = ["paris", "london", "berlin", "rome"]
ORGS = ["acme", "globex", "initech"]
FILLER = ["visited", "met", "in", "at", "the", "with", "and", "works", "for", "today", "."]
VOCAB = SPECIAL + sorted(set(FIRST + LAST[:3] + PLACES + ORGS + FILLER + ["corp", "jack"])) \
    + ["##son"]


def tagged_sentence(rng: random.Random) -> list[tuple[str, str]]:
    person = [(rng.choice(FIRST), "B-PER")] + ([(rng.choice(LAST), "I-PER")]
                                               if rng.random() < 0.6 else [])
    place = [(rng.choice(PLACES), "B-LOC")]
    org = [(rng.choice(ORGS), "B-ORG")] + ([("corp", "I-ORG")] if rng.random() < 0.5 else [])
    shape = rng.randrange(3)
    if shape == 0:
        words = person + [("visited", "O")] + place + [("today", "O"), (".", "O")]
    elif shape == 1:
        words = person + [("works", "O"), ("for", "O")] + org + [("in", "O")] + place
    else:
        words = [("the", "O")] + org + [("met", "O")] + person + [("at", "O")] + place
    return words


def write_conll(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(count):
        lines += [f"{word} NN B-NP {tag}" for word, tag in tagged_sentence(rng)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ner_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("ner_bert"), VOCAB)


@pytest.fixture(scope="session")
def conll_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("conll")
    return {"train": write_conll(folder / "train.txt", 240, 0),
            "validation": write_conll(folder / "valid.txt", 40, 1),
            "test": write_conll(folder / "test.txt", 40, 2)}


def ner_recipe(path: Path, model: Path, files: dict, **sections) -> Path:
    recipe = {"model": {"task": "token_classification", "max_length": 24},
              "data": {k: str(v) for k, v in files.items()},
              "strategy": {"kind": "lora", "lora_r": 4},
              "train": {"epochs": 6, "batch_size": 16, "lr": 3e-2, "mixed_precision": "no",
                        "log_every_steps": 10}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return write_recipe(path, model, files["train"], **recipe)


# --- data --------------------------------------------------------------------------------

def test_conll_reading_skips_docstart_and_repairs_iob1(tmp_path):
    from peftlab.tasks.ner_data import read_conll, to_iob2
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- O\n\nEU I-ORG\nrejects O\nGerman I-MISC\n\n\nPeter I-PER\n"
                    "Blackburn I-PER\n", encoding="utf-8")
    rows = read_conll(str(path), [0, -1])
    assert rows["tokens"] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert to_iob2(rows["tags"][1]) == (["B-PER", "I-PER"], 1)
    # an I- after another type opens an entity; IOB2 and BIOES pass unchanged
    assert to_iob2(["B-PER", "I-LOC", "I-LOC"]) == (["B-PER", "B-LOC", "I-LOC"], 1)
    assert to_iob2(["B-LOC", "I-LOC", "O", "B-PER"])[1] == 0
    assert to_iob2(["S-PER", "O", "B-LOC", "E-LOC"])[1] == 0


def test_tagged_data_errors_name_the_place(tmp_path, ner_bert, conll_files):
    from peftlab.config import load_recipe
    from peftlab.tasks.ner_data import load_tagged_data
    unknown = tmp_path / "valid.txt"
    unknown.write_text("john B-PER\nvisited O\nmars B-PLANET\n", encoding="utf-8")
    recipe = load_recipe(ner_recipe(tmp_path / "r.yaml", ner_bert,
                                    {**conll_files, "validation": unknown}))
    with pytest.raises(PeftlabError, match="tag 'B-PLANET' does not occur in train"):
        load_tagged_data(recipe)
    broken = tmp_path / "broken.txt"
    broken.write_text("john B-PER\nvisited X-Y\n", encoding="utf-8")
    recipe.data.validation = str(broken)
    with pytest.raises(PeftlabError, match="tag 'X-Y' is not O or B-/I-/E-/S-"):
        load_tagged_data(recipe)
    table = tmp_path / "rows.jsonl"
    table.write_text(json.dumps({"tokens": ["john", "met"], "ner_tags": ["B-PER"]}) + "\n")
    recipe.data.validation = str(table)
    with pytest.raises(PeftlabError, match="sentence 1 has 2 tokens and 1 tags"):
        load_tagged_data(recipe)


def test_jsonl_rows_and_missing_splits(tmp_path, ner_bert):
    from peftlab.config import load_recipe
    from peftlab.tasks.ner_data import load_tagged_data
    rng = random.Random(0)
    rows = [dict(zip(("tokens", "ner_tags"), map(list, zip(*tagged_sentence(rng)))))
            for _ in range(50)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    recipe = load_recipe(ner_recipe(tmp_path / "r.yaml", ner_bert, {"train": path}))
    data = load_tagged_data(recipe)
    assert data.tag_names[0] == "O" and {"B-PER", "I-PER", "B-LOC", "B-ORG"} <= set(
        data.tag_names)
    sizes = {split: len(ds) for split, ds in data.splits.items()}
    assert sizes == {"train": 40, "validation": 5, "test": 5}
    again = load_tagged_data(recipe)  # seeded: the same sentences every time
    assert again.splits["test"]["tokens"] == data.splits["test"]["tokens"]


def test_datasets_folder_with_class_label_tags(tmp_path, ner_bert):
    """A saved DatasetDict (the hub's conll2003 layout): integer tags named by the
    ClassLabel feature, its own validation and test splits."""
    import datasets

    from peftlab.config import load_recipe
    from peftlab.tasks.ner_data import load_tagged_data
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    features = datasets.Features({
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    rng = random.Random(0)

    def split(count):
        rows = [tagged_sentence(rng) for _ in range(count)]
        return datasets.Dataset.from_dict(
            {"tokens": [[w for w, _ in r] for r in rows],
             "ner_tags": [[names.index(t) for _, t in r] for r in rows]}, features=features)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": split(30), "validation": split(6),
                          "test": split(5)}).save_to_disk(str(folder))
    data = load_tagged_data(load_recipe(ner_recipe(tmp_path / "r.yaml", ner_bert,
                                                   {"train": folder})))
    assert {s: len(d) for s, d in data.splits.items()} == {"train": 30, "validation": 6,
                                                           "test": 5}
    first = data.splits["train"][0]
    expected = tagged_sentence(random.Random(0))  # the first sentence split(30) drew
    assert first["tokens"] == [w for w, _ in expected]
    assert [data.tag_names[t] for t in first["tags"]] == [t for _, t in expected]


def test_labels_sit_on_the_first_sub_token(ner_bert):
    import datasets
    from transformers import AutoTokenizer

    from peftlab.tasks.token_classification import encode_splits
    tokenizer = AutoTokenizer.from_pretrained(ner_bert)
    names = ["O", "B-PER", "I-PER"]
    split = datasets.Dataset.from_dict({"tokens": [["mary", "jackson", "visited"]],
                                        "tags": [[1, 2, 0]]})
    first = encode_splits({"t": split}, tokenizer, 16, names, False)["t"][0]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == [
        "[CLS]", "mary", "jack", "##son", "visited", "[SEP]"]
    assert first["labels"] == [-100, 1, 2, -100, 0, -100]
    assert first["word_starts"] == [0, 1, 1, 0, 1, 0]
    every = encode_splits({"t": split.map(lambda r: {"tags": [1, 1, 0]})}, tokenizer, 16,
                          names, True)["t"][0]
    assert every["labels"] == [-100, 1, 1, 2, 0, -100]  # B-PER's later piece is I-PER
    cut = encode_splits({"t": split}, tokenizer, 4, names, False)["t"][0]
    assert cut["word_tags"] == [1, 2, 0] and sum(cut["word_starts"]) == 2


# --- metrics -----------------------------------------------------------------------------

def test_entity_scores_count_a_partial_span_as_wrong():
    from peftlab.tasks.ner_metrics import entity_metrics
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # PER cut short: wrong
    result = entity_metrics(gold, predicted)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["per_type"]["PER"]["f1"] == 0.0 and result["per_type"]["LOC"]["f1"] == 1.0
    extra = entity_metrics([["B-PER", "O"]], [["B-PER", "B-LOC"]])
    assert extra["precision"] == 0.5 and extra["recall"] == 1.0


def test_words_to_entities_slice_the_text():
    from peftlab.tasks.ner_metrics import words_to_entities
    text = "Mary Jackson visited Paris"
    words = [["B-PER", 0.9, 0, 4], ["I-PER", 0.7, 5, 12], ["O", 0.99, 13, 20],
             ["B-LOC", 0.8, 21, 26]]
    entities = words_to_entities(text, words)
    assert [(e["entity"], e["text"]) for e in entities] == [("PER", "Mary Jackson"),
                                                             ("LOC", "Paris")]
    assert entities[0]["score"] == pytest.approx(0.8)
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)


# --- training, reload, predict -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "full", "dora", "head", "freeze", "gradual"])
def test_every_strategy_trains_and_reloads_to_the_same_scores(tmp_path, ner_bert,
                                                               conll_files, kind):
    from peftlab.config import load_recipe
    from peftlab.train import run
    strategy = {"kind": kind, **({"freeze_layers": 1} if kind == "freeze" else {})}
    recipe = load_recipe(ner_recipe(tmp_path / "r.yaml", ner_bert, conll_files,
                                    strategy=strategy))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    test = result["metrics"]["test"]
    floor = {"head": 0.3, "freeze": 0.8}.get(kind, 0.9)  # a frozen random body learns less
    assert test["f1"] >= floor, test
    assert set(test["per_type"]) == {"PER", "LOC", "ORG"}
    assert main(["eval", str(tmp_path / "run"), "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["test"]
    for key in ("f1", "precision", "recall", "accuracy"):
        assert again[key] == pytest.approx(test[key], abs=1e-9), key
    assert again["loss"] == pytest.approx(test["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, ner_bert, conll_files) -> Path:
    from peftlab.config import load_recipe
    from peftlab.train import run
    folder = tmp_path_factory.mktemp("ner_lora")
    run(load_recipe(ner_recipe(folder / "r.yaml", ner_bert, conll_files)),
        output_dir=str(folder / "run"))
    return folder / "run"


def test_adapter_loads_with_plain_peft(lora_run, ner_bert):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from peftlab.artifacts import load_trained
    info = json.loads((lora_run / "peftlab.json").read_text())
    base = AutoModelForTokenClassification.from_pretrained(
        ner_bert, num_labels=len(info["tag_names"]))
    plain = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    ours, _, _, _ = load_trained(lora_run)
    batch = AutoTokenizer.from_pretrained(lora_run / "adapter")(
        ["mary jackson visited paris"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-5)
    assert plain.peft_config["default"].task_type is None  # generic PeftModel (_peft_task)


def test_predict_offsets_slice_the_input(lora_run, tmp_path, capsys):
    text = "Mary Jackson works for Acme corp in Paris ."
    assert main(["predict", str(lora_run), "--text", text]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert found["text"] == text
    spans = [(e["entity"], e["text"]) for e in found["entities"]]
    assert spans == [("PER", "Mary Jackson"), ("ORG", "Acme corp"), ("LOC", "Paris")], spans
    assert all(text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
               for e in found["entities"])

    source = tmp_path / "in.csv"
    source.write_text("text\n" + text + "\nthe globex met anna at rome\n", encoding="utf-8")
    assert main(["predict", str(lora_run), "--file", str(source), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["entities"] == found["entities"]
    assert [(e["entity"], e["text"]) for e in rows[1]["entities"]] == [
        ("ORG", "globex"), ("PER", "anna"), ("LOC", "rome")]
    assert main(["predict", str(lora_run), "--file", str(source), "--output",
                 str(tmp_path / "out.csv")]) == 0
    import csv
    with open(tmp_path / "out.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert json.loads(table[0]["entities"]) == found["entities"]


def test_truncated_words_count_as_missed(tmp_path, lora_run):
    """The same run scored with max_length 6: entities past the cut lower the recall."""
    recipe = yaml.safe_load((lora_run / "recipe.yaml").read_text())
    short = tmp_path / "run"
    import shutil
    shutil.copytree(lora_run, short)
    recipe["model"]["max_length"] = 6
    (short / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["eval", str(short), "--json", str(tmp_path / "e.json")]) == 0
    cut = json.loads((tmp_path / "e.json").read_text())["test"]
    assert cut["recall"] < 0.8 and cut["sentences"] == 40, cut


def test_cache_frozen_true_is_refused_for_ner(tmp_path, ner_bert, conll_files):
    from peftlab.config import load_recipe
    from peftlab.train import run
    recipe = load_recipe(ner_recipe(tmp_path / "r.yaml", ner_bert, conll_files,
                                    strategy={"kind": "head"}, train={"cache_frozen": True}))
    with pytest.raises(PeftlabError, match="has no frozen-feature cache"):
        run(recipe, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_planner_sizes_a_token_classifier(tmp_path, ner_bert, conll_files, capsys):
    assert main(["plan", str(ner_recipe(tmp_path / "r.yaml", ner_bert, conll_files)),
                 "--strategies", "lora,full"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "full" in out


def test_two_processes_equal_one_with_twice_the_batch(tmp_path, ner_bert, conll_files):
    """Tokens are the loss's items: 2 ranks x batch 4 equal 1 x batch 8, and evaluation
    gathers every sentence once (padded word tensors of different widths per rank)."""
    from test_distributed import one_against_two_processes
    recipe = ner_recipe(tmp_path / "r.yaml", ner_bert, conll_files,
                        train={"epochs": 1, "batch_size": 4, "cpu": True,
                               "group_by_length": False, "eval_every_steps": 10})
    one_against_two_processes(tmp_path, recipe, batch=4)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text())
               for run in ("one", "two")]
    for split in ("validation", "test"):
        assert metrics[1][split]["sentences"] == 40
        assert metrics[0][split]["f1"] == pytest.approx(metrics[1][split]["f1"], abs=1e-9)
