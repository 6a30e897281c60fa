"""The recipe's data section -> raw splits, shared by every task; tokenizing and the
unknown-token check for text tasks.

Reading is the same for all tasks: each of train/validation/test is a file, folder or hub
dataset, and a saved DatasetDict given as train brings the evaluation splits the recipe
leaves out. What a row means (a label, a tag sequence, a chat) is the task's business.
"""

from __future__ import annotations

import random

import datasets
from sklearn.model_selection import train_test_split

from peftlab.config import Recipe, resolve_data_path
from peftlab.sources import pick_split, read_source
from peftlab.token_cache import tokenized

SPLITS = ("train", "validation", "test")
UNKNOWN_SAMPLE_ROWS = 2000  # train rows read to measure the unknown-token share
UNKNOWN_WARNING = 0.05  # unknown-token share above which the data report warns


def stratified_split(n_rows: int, labels: list[int], size: float, seed: int):
    """Indices (kept, taken) with `size` taken (a share if float, a row count if int, as
    sklearn's test_size), stratified when every class has 2 rows."""
    indices = list(range(n_rows))
    counts = {label: labels.count(label) for label in set(labels)}
    stratify = labels if min(counts.values()) >= 2 else None
    try:
        return train_test_split(indices, test_size=size, random_state=seed, stratify=stratify)
    except ValueError:  # too few rows per class for the requested size
        return train_test_split(indices, test_size=size, random_state=seed)


def missing_split_shares(present, recipe: Recipe) -> dict[str, float]:
    """Which share of train a missing validation/test split takes, keeping the recipe's
    train/val/test ratios: with both missing, test takes its share of all rows and
    validation its share of the rest; with one missing, r / (train_ratio + r) of train.
    Splits that are present (or have a zero ratio) are not in the result."""
    train_ratio, val_ratio, test_ratio = recipe.data.split_ratios
    shares = {"test": test_ratio if "validation" not in present else
              test_ratio / max(train_ratio + test_ratio, 1e-9),
              "validation": val_ratio / max(train_ratio + val_ratio, 1e-9)}
    return {split: share for split, share in shares.items()
            if split not in present and share > 0}


def random_rows(rows: dict[str, list], count: int | None, seed: int) -> dict[str, list]:
    """A seeded random `count` of column-dict rows, in their order (all when fewer)."""
    size = len(next(iter(rows.values())))
    if not count or size <= count:
        return rows
    chosen = sorted(random.Random(seed).sample(range(size), count))
    return {k: [v[i] for i in chosen] for k, v in rows.items()}


def limited_splits(rows: dict[str, dict], recipe: Recipe, report: dict) -> datasets.DatasetDict:
    """Column-dict splits -> a DatasetDict, after data.max_train_samples (train) and
    data.max_eval_samples (validation, test), seeded; the report gets each split's `used`."""
    limits = {"train": recipe.data.max_train_samples, "validation": recipe.data.max_eval_samples,
              "test": recipe.data.max_eval_samples}
    splits = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(random_rows(columns, limits[split], recipe.train.seed))
        for split, columns in rows.items()})
    for split in splits:
        report.setdefault(split, {})["used"] = len(splits[split])
    return splits


def read_splits(recipe: Recipe) -> dict[str, datasets.Dataset]:
    """The recipe's train/validation/test sources; a saved or hub DatasetDict given as train
    also supplies the eval splits the recipe leaves out."""
    data = recipe.data
    found: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        value = getattr(data, split)
        if not value:
            continue
        path = resolve_data_path(value, recipe)
        source = read_source(path, data.format, data.text_column, data.label_column)
        if isinstance(source, datasets.DatasetDict):
            found[split] = pick_split(source, "train" if split == "train" else split, path)
            if split == "train":  # a saved/hub DatasetDict brings its own eval splits
                for other in ("validation", "test"):
                    extra = pick_split(source, other, path)
                    if extra is not None and not getattr(data, other):
                        found[other] = extra
        else:
            found[split] = source
    return {k: v for k, v in found.items() if v is not None}


def where(recipe: Recipe, split: str) -> str:
    """How errors name a split: its key and the file it came from."""
    return f"data.{split} ({getattr(recipe.data, split) or recipe.data.train})"


def tokenize_splits(splits: datasets.DatasetDict, tokenizer, max_length: int):
    """Token ids per split, truncated to max_length; padding happens per batch. A split seen
    before (same rows, tokenizer and length) comes from the content-hash cache."""
    def encode(batch):
        pair = batch.get("text_pair")
        return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)

    def tokenize(split: datasets.Dataset) -> datasets.Dataset:
        drop = [c for c in ("text", "text_pair") if c in split.column_names]
        return split.map(encode, batched=True, remove_columns=drop, desc="tokenize")

    return datasets.DatasetDict({name: tokenized(split, tokenizer, max_length, tokenize)
                                 for name, split in splits.items()})


def unknown_token_rate(tokenized_train: datasets.Dataset, tokenizer) -> float | None:
    """Share of train tokens (special tokens aside) that are the tokenizer's unknown token.

    Text outside a model's vocabulary (Chinese on an English BERT) trains on [UNK]s without
    any error, so the data report says how much. Counted on up to UNKNOWN_SAMPLE_ROWS evenly
    spaced rows: enough for a share, cheap on large data. None when the tokenizer has no real
    unknown token (byte-level BPE such as GPT-2's names EOS as its unk; it never emits it).
    """
    unk = tokenizer.unk_token_id
    n_rows = len(tokenized_train)
    if unk is None or unk in (tokenizer.bos_token_id, tokenizer.eos_token_id) or not n_rows:
        return None
    sample = min(n_rows, UNKNOWN_SAMPLE_ROWS)
    rows = tokenized_train.select([i * n_rows // sample for i in range(sample)])["input_ids"]
    special = set(tokenizer.all_special_ids) - {unk}
    tokens = [token for ids in rows for token in ids if token not in special]
    return tokens.count(unk) / len(tokens) if tokens else 0.0


def format_unknown_tokens(rate: float | None, model_name: str) -> str:
    """The data report's unknown-token line, and a warning when the share is high."""
    if rate is None:
        return ""
    line = f"train: {rate:.1%} of tokens are unknown to the tokenizer"
    if rate > UNKNOWN_WARNING:
        line += (f"\nwarning: {rate:.0%} of the train tokens are unknown to {model_name}; "
                 f"set model.name to a model whose vocabulary covers the data's language "
                 f"and script")
    return line
