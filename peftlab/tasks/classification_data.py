"""Classification data: clean, labelled train/validation/test splits.

The order is fixed: read each source, keep the mapped columns, drop unusable rows (counted),
map labels to ids from train, then split off whatever validation/test is missing with a
seeded stratified split. Tokenization and batching come last and know nothing of files.
What looks wrong but is not an error (labels differing only in case, a one-class evaluation
split, text the tokenizer cannot read) becomes a `warning:` line of the data report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import datasets

from peftlab.config import Recipe
from peftlab.data import SPLITS, missing_split_shares, read_splits, stratified_split, where
from peftlab.errors import PeftlabError
from peftlab.sources import pick_split, read_source


@dataclass
class LabelledData:
    """Clean splits with columns text, [text_pair], labels; label ids index `label_names`.
    `report` holds per-split counts and a "warnings" list of lines for format_report."""

    splits: datasets.DatasetDict
    label_names: list[str]
    report: dict = field(default_factory=dict)


def _normalise_label(value):
    """Labels as text keys: 1, 1.0 and "1" are the same class; None / NaN / "" are missing."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def _fold_case(label: str, recipe: Recipe) -> str:
    """Under data.label_case lower, "Positive" and "POSITIVE" are one class (str.casefold)."""
    return label.casefold() if recipe.data.label_case == "lower" else label


def _clean_label(value, recipe: Recipe) -> str | None:
    """A raw label as its class key: normalised, cut at data.label_delimiter, case-folded."""
    label = _normalise_label(value)
    if label is None:
        return None
    if recipe.data.label_delimiter:
        label = label.split(recipe.data.label_delimiter)[0]
    return _fold_case(label, recipe)


def _check_columns(dataset: datasets.Dataset, recipe: Recipe, where: str) -> None:
    wanted = [recipe.data.text_column, recipe.data.label_column]
    if recipe.data.text_pair_column:
        wanted.insert(1, recipe.data.text_pair_column)
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise PeftlabError(f"{where}: no column '{missing[0]}' (columns: "
                           f"{', '.join(dataset.column_names)}); map it with data."
                           f"{'label_column' if missing[0] == recipe.data.label_column else 'text_column'}")


def clean_split(dataset: datasets.Dataset, recipe: Recipe, where: str) -> tuple[dict, dict]:
    """Keep the mapped columns; drop rows with empty text or no label. Returns columns, counts."""
    _check_columns(dataset, recipe, where)
    data = recipe.data
    texts = dataset[data.text_column]
    pairs = dataset[data.text_pair_column] if data.text_pair_column else None
    raw_labels = dataset[data.label_column]
    out = {"text": [], "label": []} | ({"text_pair": []} if pairs is not None else {})
    dropped = {"empty_text": 0, "missing_label": 0}
    for i, (text, label) in enumerate(zip(texts, raw_labels)):
        text = text.strip() if isinstance(text, str) else ""
        pair = pairs[i].strip() if pairs is not None and isinstance(pairs[i], str) else ""
        label = _clean_label(label, recipe)
        if not text or (pairs is not None and not pair):
            dropped["empty_text"] += 1
            continue
        if label is None:
            dropped["missing_label"] += 1
            continue
        out["text"].append(text)
        out["label"].append(label)
        if pairs is not None:
            out["text_pair"].append(pair)
    return out, {"rows": len(texts), "kept": len(out["text"]), **dropped}


def label_vocabulary(train_labels: list[str], recipe: Recipe) -> list[str]:
    """Class names in id order: label_names if given, numeric order for int labels, else sorted."""
    present = sorted(set(train_labels))
    names = recipe.data.label_names
    if names:
        if all(p.isdigit() for p in present):
            bad = [p for p in present if int(p) >= len(names)]
            if bad:
                raise PeftlabError(f"{recipe.source}: data.label_names has {len(names)} names but "
                                   f"train has label {bad[0]}")
            return list(names)
        folded = {_fold_case(name, recipe) for name in names}
        if len(folded) < len(names):
            raise PeftlabError(f"{recipe.source}: data.label_names has a class twice "
                               f"({', '.join(names)}); under data.label_case lower, names "
                               f"differing only in case are one class")
        unknown = [p for p in present if p not in folded]
        if unknown:
            raise PeftlabError(f"data.train: label '{unknown[0]}' is not in data.label_names "
                               f"({', '.join(names)})")
        return list(names)
    if all(p.lstrip("-").isdigit() for p in present):
        return sorted(present, key=int)
    return present


def _labels_index_names(recipe: Recipe, labels: list[str]) -> bool:
    """With data.label_names, integer labels are positions in that list, not names."""
    return bool(recipe.data.label_names) and all(label.isdigit() for label in labels)


def _case_warnings(train_labels: list[str]) -> list[str]:
    """Labels that differ only in case are separate classes under label_case keep: say so."""
    groups: dict[str, list[str]] = {}
    for label in sorted(set(train_labels)):
        groups.setdefault(label.casefold(), []).append(label)
    clashes = ["/".join(f"'{label}'" for label in group) for group in groups.values()
               if len(group) > 1]
    if not clashes:
        return []
    return [(f"data.train: labels {', '.join(clashes)} differ only in case and are separate "
             f"classes; set data.label_case: lower to merge them")]


def _to_ids(columns: dict, names: list[str], numeric_names: bool, where: str,
            recipe: Recipe) -> dict:
    index = {_fold_case(name, recipe): i for i, name in enumerate(names)}
    ids = []
    for label in columns["label"]:
        key = names[int(label)] if numeric_names and label.isdigit() and int(label) < len(
            names) else label
        key = _fold_case(key, recipe)
        if key not in index:
            raise PeftlabError(f"{where}: label '{label}' does not occur in train "
                               f"(train labels: {', '.join(names)})")
        ids.append(index[key])
    rest = {k: v for k, v in columns.items() if k != "label"}
    return rest | {"labels": ids}


def load_labelled_data(recipe: Recipe) -> LabelledData:
    """Read, clean, label and split the recipe's data; prints nothing (see format_report)."""
    raw = read_splits(recipe)
    columns, report = {}, {}
    for split, dataset in raw.items():
        columns[split], report[split] = clean_split(dataset, recipe, where(recipe, split))
    if not columns["train"]["text"]:
        raise PeftlabError(f"{where(recipe, 'train')}: no usable rows "
                           f"(every row has an empty text or a missing label)")
    names = label_vocabulary(columns["train"]["label"], recipe)
    if len(set(columns["train"]["label"])) < 2:
        raise PeftlabError(f"{where(recipe, 'train')}: only one class ('{names[0]}'); "
                           f"a classifier needs two")
    numeric = _labels_index_names(recipe, columns["train"]["label"])
    ids = {s: _to_ids(c, names, numeric, where(recipe, s), recipe) for s, c in columns.items()}
    ids = split_missing(ids, recipe, report)
    splits = datasets.DatasetDict({s: datasets.Dataset.from_dict(c) for s, c in ids.items()})
    splits = _limit(splits, recipe)
    for split in splits:
        report.setdefault(split, {})["used"] = len(splits[split])
    report["warnings"] = (_case_warnings(columns["train"]["label"])
                          + _one_class_warnings(splits, names, recipe))
    return LabelledData(splits=splits, label_names=names, report=report)


def _one_class_warnings(splits: datasets.DatasetDict, names: list[str],
                        recipe: Recipe) -> list[str]:
    """An evaluation split of one class scores any model that always says it as perfect."""
    warnings = []
    for split in ("validation", "test"):
        present = set(splits[split]["labels"]) if split in splits else set()
        if len(present) == 1:
            name = names[present.pop()]
            warnings.append(f"{where(recipe, split)}: every row is class '{name}'; its "
                            f"accuracy and F1 say nothing about the other classes")
    return warnings


def split_missing(ids: dict, recipe: Recipe, report: dict) -> dict:
    """Carve missing validation/test out of train, keeping the recipe's train/val/test ratios.

    With both missing, test takes its share of all rows and validation its share of the rest;
    with one missing, it takes share r / (train_ratio + r) of train.
    """
    shares = missing_split_shares(ids, recipe)
    for split in shares:
        train = ids["train"]
        if len(train["labels"]) * shares[split] < 1 or shares[split] >= 1:
            raise PeftlabError(f"data.train: too few rows ({len(train['labels'])}) to split off "
                               f"a {split} set; give data.{split}")
        kept, taken = stratified_split(len(train["labels"]), train["labels"], shares[split],
                                       recipe.train.seed)
        ids[split] = {k: [v[i] for i in taken] for k, v in train.items()}
        ids["train"] = {k: [v[i] for i in kept] for k, v in train.items()}
        report[split] = {"split_from_train": len(taken)}
    if "validation" not in ids:
        raise PeftlabError("data: no validation split; give data.validation or a non-zero "
                           "data.split_ratios[1]")
    return ids


def _limit(splits: datasets.DatasetDict, recipe: Recipe) -> datasets.DatasetDict:
    data = recipe.data
    if data.max_train_samples and len(splits["train"]) > data.max_train_samples:
        splits["train"] = splits["train"].shuffle(seed=recipe.train.seed).select(
            range(data.max_train_samples))
    if data.max_eval_samples:  # stratified: a file sorted by label must not give one class
        for split in ("validation", "test"):
            if split in splits and len(splits[split]) > data.max_eval_samples:
                labels = splits[split]["labels"]
                _, taken = stratified_split(len(labels), labels, data.max_eval_samples,
                                            recipe.train.seed)
                splits[split] = splits[split].select(sorted(taken))  # keep the file's order
    return splits


def format_report(data: LabelledData) -> str:
    """The data report printed before training: rows read, dropped and used per split."""
    lines = [f"labels ({len(data.label_names)}): {', '.join(data.label_names)}"]
    for split in SPLITS:
        info = data.report.get(split, {})
        if not info:
            continue
        if "split_from_train" in info:
            lines.append(f"{split}: {info['used']} rows (split off train, stratified)")
            continue
        dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in info.items()
                            if k in ("empty_text", "missing_label") and v)
        lines.append(f"{split}: {info['rows']} rows read, {info['used']} used"
                     + (f" (dropped: {dropped})" if dropped else ""))
    lines += [f"warning: {warning}" for warning in data.report.get("warnings", [])]
    return "\n".join(lines)


def load_eval_file(path: str, recipe: Recipe, label_names: list[str]) -> datasets.DatasetDict:
    """A labelled file scored against a finished run's labels (unknown labels are errors)."""
    source = read_source(path, "auto", recipe.data.text_column, recipe.data.label_column)
    if isinstance(source, datasets.DatasetDict):
        source = pick_split(source, "test", path) or pick_split(source, "train", path)
    columns, _ = clean_split(source, recipe, path)
    if not columns["text"]:
        raise PeftlabError(f"{path}: no usable rows (empty texts or missing labels)")
    numeric = _labels_index_names(recipe, columns["label"])
    ids = _to_ids(columns, label_names, numeric, path, recipe)
    return datasets.DatasetDict({"eval": datasets.Dataset.from_dict(ids)})
