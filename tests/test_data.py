import json
from collections import Counter

import datasets
import pytest
from conftest import sentiment_rows, write_recipe, write_rows

from peftlab.batches import make_loader
from peftlab.config import load_recipe, recipe_from_dict
from peftlab.data import tokenize_splits
from peftlab.errors import PeftlabError
from peftlab.tasks.classification_data import format_report, load_labelled_data


def recipe_for(train, **data):
    return recipe_from_dict({"data": {"train": str(train), **data}})


def write_format(tmp_path, fmt, rows):
    if fmt == "csv":
        return write_rows(tmp_path / "d.csv", rows)
    if fmt == "tsv":
        return write_rows(tmp_path / "d.tsv", rows, delimiter="\t")
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return path
    if fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
        return path
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path
    if fmt == "disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    if fmt == "prefixed":
        path = tmp_path / "d.label"
        path.write_text("\n".join(f"{r['label']}:x {r['text']}" for r in rows))
        return path
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet", "disk", "prefixed"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    rows = sentiment_rows(100)
    path = write_format(tmp_path, fmt, rows)
    extra = {"label_delimiter": ":"} if fmt == "prefixed" else {}
    data = load_labelled_data(recipe_for(path, **extra))
    assert data.label_names == ["neg", "pos"]
    total = sum(len(data.splits[s]) for s in data.splits)
    assert total == 100
    every_text = sorted(t for s in data.splits for t in data.splits[s]["text"])
    assert every_text == sorted(r["text"] for r in rows)


def test_saved_datasetdict_keeps_its_splits(tmp_path):
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(sentiment_rows(60)),
        "validation": datasets.Dataset.from_list(sentiment_rows(10, seed=1)),
        "test": datasets.Dataset.from_list(sentiment_rows(12, seed=2))})
    splits.save_to_disk(str(tmp_path / "dd"))
    data = load_labelled_data(recipe_for(tmp_path / "dd"))
    assert {s: len(data.splits[s]) for s in data.splits} == {
        "train": 60, "validation": 10, "test": 12}


def test_stratified_split_is_seeded_and_balanced(tmp_path):
    rows = [{"text": f"text number {i}", "label": "a" if i % 4 else "b"} for i in range(400)]
    path = write_rows(tmp_path / "d.csv", rows)
    first = load_labelled_data(recipe_for(path))
    again = load_labelled_data(recipe_for(path))
    sizes = {s: len(first.splits[s]) for s in first.splits}
    assert sizes == {"train": 320, "validation": 40, "test": 40}
    for split in ("validation", "test"):
        counts = Counter(first.splits[split]["labels"])
        assert counts == {0: 30, 1: 10}  # 75% / 25% as in the whole file
    assert first.splits["test"]["text"] == again.splits["test"]["text"]
    assert not set(first.splits["test"]["text"]) & set(first.splits["train"]["text"])


def test_only_test_missing_keeps_given_validation(tmp_path):
    train = write_rows(tmp_path / "train.csv", sentiment_rows(180))
    val = write_rows(tmp_path / "val.csv", sentiment_rows(20, seed=3))
    data = load_labelled_data(recipe_for(train, validation=str(val)))
    assert len(data.splits["validation"]) == 20
    assert len(data.splits["test"]) == 20  # 0.1 / (0.8 + 0.1) of 180


def test_string_labels_and_label_names(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(30)]
    path = write_rows(tmp_path / "d.csv", rows)
    data = load_labelled_data(recipe_for(path, label_names=["neg", "neu", "pos"]))
    assert data.label_names == ["neg", "neu", "pos"]
    by_text = dict(zip(data.splits["train"]["text"], data.splits["train"]["labels"]))
    assert all(by_text[f"t{i}"] == i % 3 for i in range(30) if f"t{i}" in by_text)


def test_rows_without_text_or_label_are_dropped_and_counted(tmp_path):
    path = tmp_path / "d.csv"
    lines = ["text,label"] + [f"text {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    lines += ['"  ",pos', "orphan text,", ",neg"]
    path.write_text("\n".join(lines) + "\n")
    data = load_labelled_data(recipe_for(path))
    assert data.report["train"]["empty_text"] == 2
    assert data.report["train"]["missing_label"] == 1
    assert sum(len(data.splits[s]) for s in data.splits) == 40


def test_unknown_label_in_validation_is_an_error(tmp_path):
    train = write_rows(tmp_path / "train.csv", sentiment_rows(40))
    val = write_rows(tmp_path / "val.csv", [{"text": "odd one", "label": "neutral"}])
    with pytest.raises(PeftlabError, match=r"data.validation \(.*\): label 'neutral' does not occur"):
        load_labelled_data(recipe_for(train, validation=str(val)))


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ("text,label\n", "no data rows"),
    ("text,label\n ,pos\n", "no usable rows"),
    ("text,label\na,pos\nb,pos\nc,pos\nd,pos\ne,pos\nf,pos\ng,pos\nh,pos\ni,pos\nj,pos\n",
     "only one class"),
    ("words,label\na,pos\n", "no column 'text'"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(PeftlabError, match=message):
        load_labelled_data(recipe_for(path))


def test_missing_file(tmp_path):
    with pytest.raises(PeftlabError, match="data file not found"):
        load_labelled_data(recipe_for(tmp_path / "nope.csv"))


def test_batches_pad_dynamically_and_group_by_length(tmp_path, tiny_bert):
    from transformers import AutoTokenizer, DataCollatorWithPadding
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    path = write_rows(tmp_path / "d.csv", sentiment_rows(200))
    data = load_labelled_data(recipe_for(path))
    tokenized = tokenize_splits(data.splits, tokenizer, max_length=8)
    assert max(len(ids) for ids in tokenized["train"]["input_ids"]) == 8  # truncated
    tokenized = tokenize_splits(data.splits, tokenizer, max_length=32)
    collate = DataCollatorWithPadding(tokenizer)
    loader = make_loader(tokenized["train"], 16, collate=collate, train=True, seed=0,
                         group_by_length=True)
    widths = [batch["input_ids"].shape[1] for batch in loader]
    assert len(set(widths)) > 1  # padded per batch, not to a global length
    assert sum(len(batch["labels"]) for batch in make_loader(
        tokenized["train"], 16, collate=collate, train=True, seed=0)) == len(tokenized["train"])


def test_text_pairs_are_encoded_together(tmp_path, tiny_bert):
    from transformers import AutoTokenizer
    rows = [{"premise": r["text"], "hypothesis": "the film", "label": r["label"]}
            for r in sentiment_rows(40)]
    path = write_rows(tmp_path / "pairs.csv", rows)
    recipe = recipe_for(path, text_column="premise", text_pair_column="hypothesis")
    data = load_labelled_data(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenized = tokenize_splits(data.splits, tokenizer, max_length=32)
    first = tokenized["train"][0]
    assert first["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(first["token_type_ids"]) == {0, 1}


SPELLINGS = ["Positive", "positive", " POSITIVE", "Negative", "negative", "NEGATIVE "]


def spelled_rows(n):
    """Sentiment rows whose labels come in six spellings of two classes."""
    rows = sentiment_rows(n)
    for i, row in enumerate(rows):
        row["label"] = SPELLINGS[(i % 3) + (0 if row["label"] == "pos" else 3)]
    return rows


def test_labels_differing_only_in_case_are_warned_under_keep(tmp_path):
    path = write_rows(tmp_path / "d.csv", spelled_rows(120))
    data = load_labelled_data(recipe_for(path))
    assert len(data.label_names) == 6
    warnings = [line for line in format_report(data).splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 1
    assert all(name in warnings[0] for name in ("Positive", "positive", "POSITIVE"))
    assert "data.label_case: lower" in warnings[0]


def test_label_case_lower_folds_labels_in_every_split(tmp_path):
    train = write_rows(tmp_path / "train.csv", spelled_rows(120))
    val = write_rows(tmp_path / "val.csv", [{"text": "good film", "label": "POSITIVE"},
                                            {"text": "bad film", "label": " negative"}])
    data = load_labelled_data(recipe_for(train, validation=str(val), label_case="lower"))
    assert data.label_names == ["negative", "positive"]
    assert data.splits["validation"]["labels"] == [1, 0]
    assert "warning:" not in format_report(data)


def test_label_case_lower_matches_label_names_case_folded(tmp_path):
    path = write_rows(tmp_path / "d.csv", spelled_rows(60))
    data = load_labelled_data(recipe_for(path, label_case="lower",
                                         label_names=["Negative", "Positive"]))
    assert data.label_names == ["Negative", "Positive"]
    by_text = {r["text"]: r["label"] for r in spelled_rows(60)}
    assert all(data.label_names[i].lower() == by_text[t].strip().lower()
               for t, i in zip(data.splits["train"]["text"], data.splits["train"]["labels"]))


def test_max_eval_samples_is_a_seeded_stratified_subset(tmp_path):
    train = write_rows(tmp_path / "train.csv", sentiment_rows(100))
    ordered = sorted(sentiment_rows(200, seed=5), key=lambda r: r["label"])
    val = write_rows(tmp_path / "val.csv", ordered)
    recipe = recipe_for(train, validation=str(val), max_eval_samples=20)
    first, again = load_labelled_data(recipe), load_labelled_data(recipe)
    assert Counter(first.splits["validation"]["labels"]) == {0: 10, 1: 10}
    assert first.splits["validation"]["text"] == again.splits["validation"]["text"]
    position = {r["text"]: i for i, r in enumerate(ordered)}
    kept = [position[t] for t in first.splits["validation"]["text"]]
    assert kept == sorted(kept)  # the file's order is kept
    other = load_labelled_data(recipe_from_dict({
        "data": {"train": str(train), "validation": str(val), "max_eval_samples": 20},
        "train": {"seed": 7}}))
    assert other.splits["validation"]["text"] != first.splits["validation"]["text"]


def test_single_class_eval_split_is_warned(tmp_path):
    train = write_rows(tmp_path / "train.csv", sentiment_rows(100))
    val = write_rows(tmp_path / "val.csv", [r for r in sentiment_rows(40) if r["label"] == "pos"])
    report = format_report(load_labelled_data(recipe_for(train, validation=str(val))))
    warnings = [line for line in report.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "validation" in warnings[0] and "pos" in warnings[0]


def foreign_rows(n):
    """Rows of three words the tiny tokenizer does not know and one it does: 75% unknown."""
    rows = sentiment_rows(n)
    for row in rows:
        row["text"] = " ".join(["zorp", "quix", "blat"] + row["text"].split()[:1])
    return rows


def test_unknown_token_rate(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    from peftlab.data import unknown_token_rate
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    for rows, low, high in ((sentiment_rows(100), 0.0, 0.0), (foreign_rows(100), 0.7, 0.8)):
        data = load_labelled_data(recipe_for(write_rows(tmp_path / "d.csv", rows)))
        tokenized = tokenize_splits(data.splits, tokenizer, max_length=32)
        assert low <= unknown_token_rate(tokenized["train"], tokenizer) <= high


def test_unknown_tokens_are_reported_before_training(tmp_path, tiny_bert):
    from peftlab.tasks.classification import prepare as prepare_classification
    for rows, warned in ((sentiment_rows(100), False), (foreign_rows(100), True)):
        path = write_recipe(tmp_path / "r.yaml", tiny_bert,
                            write_rows(tmp_path / "d.csv", rows))
        said = []
        prepare_classification(load_recipe(path), said.append)
        lines = "\n".join(said).splitlines()
        assert any(line.startswith("train: ") and "% of tokens are unknown" in line
                   for line in lines)
        warnings = [line for line in lines if line.startswith("warning:")]
        assert bool(warnings) == warned
        assert not warned or str(tiny_bert) in warnings[0]
