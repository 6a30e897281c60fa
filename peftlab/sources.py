"""Read a user's data source (file, saved folder, hub name) into `datasets` objects.

Only reading lives here; cleaning, labels and splits are in data.py. Every failure a user can
cause (missing file, bad encoding, malformed rows) becomes one PeftlabError line that names
the file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets

from peftlab.errors import PeftlabError

SUFFIX_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet",
    ".label": "prefixed", ".txt": "prefixed",
}
SPLIT_ALIASES = {"validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def detect_format(path: str, declared: str) -> str:
    """The declared format, or one guessed from the suffix / folder / hub name."""
    if declared != "auto":
        return declared
    target = Path(path)
    if target.is_dir():
        return "disk"
    if target.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[target.suffix.lower()]
    if target.exists():
        raise PeftlabError(f"{path}: cannot tell the format from the suffix '{target.suffix}'; "
                           f"set data.format (csv, tsv, json, jsonl, parquet, prefixed)")
    if target.suffix or path.startswith((".", "/", "~")):
        raise PeftlabError(f"{path}: data file not found (relative paths resolve against "
                           f"$PEFTLAB_DATA when set, else the recipe's folder)")
    return "hub"


def _root_message(err: BaseException) -> str:
    """The innermost cause's first line: datasets wraps parser errors several times."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def read_prefixed(path: str, text_column: str, label_column: str) -> datasets.Dataset:
    """Lines of `LABEL text...` (TREC, fastText style): the label is the first token."""
    labels, texts = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            label, _, text = line.partition(" ")
            labels.append(label.removeprefix("__label__"))
            texts.append(text)
    return datasets.Dataset.from_dict({text_column: texts, label_column: labels})


def _read_file(path: str, fmt: str, text_column: str, label_column: str) -> datasets.Dataset:
    if fmt == "prefixed":
        return read_prefixed(path, text_column, label_column)
    if fmt in ("csv", "tsv"):
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        return datasets.load_dataset("csv", data_files=path, split="train", **options)
    builder = "json" if fmt in ("json", "jsonl") else fmt
    return datasets.load_dataset(builder, data_files=path, split="train")


def read_source(path: str, declared_format: str, text_column: str,
                label_column: str) -> datasets.Dataset | datasets.DatasetDict:
    """Load one data source; a saved DatasetDict or hub dataset keeps its splits."""
    fmt = detect_format(path, declared_format)
    if fmt not in ("hub", "disk") and not Path(path).is_file():
        raise PeftlabError(f"{path}: data file not found (relative paths resolve against "
                           f"$PEFTLAB_DATA when set, else the recipe's folder)")
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise PeftlabError(f"{path}: the file is empty")
    try:
        if fmt == "disk":
            if not Path(path).is_dir():
                raise PeftlabError(f"{path}: no `datasets` folder (save_to_disk) here")
            return datasets.load_from_disk(path)
        if fmt == "hub":
            return datasets.load_dataset(path)
        return _read_file(path, fmt, text_column, label_column)
    except PeftlabError:
        raise
    except Exception as err:  # noqa: BLE001 - every reader error is the user's file
        cause = _root_message(err)
        if "corresponds to no data" in cause:
            raise PeftlabError(f"{path}: no data rows (only a header?)") from None
        raise PeftlabError(f"{path}: could not read as {fmt} ({cause})") from None


def pick_split(source: datasets.DatasetDict, split: str, where: str) -> datasets.Dataset | None:
    """The split of a DatasetDict under its usual names (validation = dev = valid)."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in source:
            return source[name]
    if split == "train":
        raise PeftlabError(f"{where}: has splits {', '.join(source)}, but no 'train' split")
    return None
