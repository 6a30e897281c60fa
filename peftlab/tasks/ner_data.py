"""Token-classification data: sentences as word and tag lists, a tag set from train, and
features whose labels sit on each word's first sub-token.

Sources are CoNLL column files (a token per line, its tag in the last column, blank lines
between sentences, `-DOCSTART-` skipped), JSON/JSONL/Parquet/CSV rows with token and tag
lists, or `datasets` folders (integer tags are named by their ClassLabel feature or
data.label_names). Tags are normalised to IOB2: CoNLL-2003 ships in IOB1 too, where an
entity starts with I- unless it follows one of the same type. BIOES passes unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from peftlab.config import Recipe, resolve_data_path
from peftlab.data import SPLITS, limited_splits, missing_split_shares, where
from peftlab.errors import PeftlabError
from peftlab.sources import pick_split, read_source

CONLL_SUFFIXES = (".conll", ".conllu", ".txt", ".iob", ".iob2", ".bio", ".tsv")
OUTSIDE = "O"


@dataclass
class TaggedData:
    """Splits with columns tokens (list of words) and tags (list of tag ids into tag_names)."""

    splits: datasets.DatasetDict
    tag_names: list[str]
    report: dict = field(default_factory=dict)


def read_conll(path: str, columns: list[int]) -> dict[str, list]:
    """Sentences of a CoNLL column file: `columns` = (token, tag) positions on a line."""
    sentences, tags, words, labels = [], [], [], []
    token_at, tag_at = columns
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sentences.append(words)
                    tags.append(labels)
                words, labels = [], []
                continue
            try:
                words.append(fields[token_at])
                labels.append(fields[tag_at])
            except IndexError:
                raise PeftlabError(f"{path}:{number}: {len(fields)} columns, but "
                                   f"data.conll_columns is {columns}") from None
    if words:
        sentences.append(words)
        tags.append(labels)
    if not sentences:
        raise PeftlabError(f"{path}: no sentences (a token per line, blank lines between "
                           f"sentences)")
    return {"tokens": sentences, "tags": tags}


def to_iob2(tags: list[str]) -> tuple[list[str], int]:
    """IOB1 -> IOB2 (I-X opening an entity becomes B-X); returns the tags and how many
    changed. IOB2 and BIOES come back as they were."""
    out, changed, previous = [], 0, OUTSIDE
    for tag in tags:
        if tag.startswith("I-") and (previous == OUTSIDE or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
            changed += 1
        out.append(tag)
        previous = tag
    return out, changed


def _check_tag(tag: str, where_: str) -> None:
    if tag != OUTSIDE and (len(tag) < 3 or tag[1] != "-" or tag[0] not in "BIES"):
        raise PeftlabError(f"{where_}: tag '{tag}' is not O or B-/I-/E-/S- followed by a type "
                           f"(IOB1, IOB2 and BIOES are read)")


def _rows_of_table(source: datasets.Dataset, recipe: Recipe, where_: str) -> dict[str, list]:
    data = recipe.data
    missing = [c for c in (data.tokens_column, data.tags_column) if c not in source.column_names]
    if missing:
        raise PeftlabError(f"{where_}: no column '{missing[0]}' (columns: "
                           f"{', '.join(source.column_names)}); map it with data."
                           f"{'tokens_column' if missing[0] == data.tokens_column else 'tags_column'}")
    tags = source[data.tags_column]
    feature = source.features[data.tags_column]
    names = getattr(getattr(feature, "feature", None), "names", None) or data.label_names
    if tags and tags[0] and isinstance(tags[0][0], int):
        if not names:
            raise PeftlabError(f"{where_}: integer tags and no names for them; set "
                               f"data.label_names (in id order)")
        try:
            tags = [[names[t] for t in row] for row in tags]
        except IndexError:
            raise PeftlabError(f"{where_}: a tag id beyond data.label_names "
                               f"({len(names)} names)") from None
    return {"tokens": [list(map(str, row)) for row in source[data.tokens_column]],
            "tags": [list(map(str, row)) for row in tags]}


def read_tagged(value: str, recipe: Recipe, split: str) -> dict[str, list] | None:
    """One split's sentences from a CoNLL file or a table of token and tag lists."""
    path = resolve_data_path(value, recipe)
    fmt = recipe.data.format
    if fmt == "conll" or (fmt == "auto" and Path(path).suffix.lower() in CONLL_SUFFIXES):
        if not Path(path).is_file():
            raise PeftlabError(f"{path}: data file not found (relative paths resolve against "
                               f"$PEFTLAB_DATA when set, else the recipe's folder)")
        return read_conll(path, recipe.data.conll_columns)
    source = read_source(path, fmt, recipe.data.tokens_column, recipe.data.tags_column)
    if isinstance(source, datasets.DatasetDict):
        source = pick_split(source, split, path)
        if source is None:
            return None
    return _rows_of_table(source, recipe, f"data.{split} ({path})")


def _clean(rows: dict[str, list], where_: str) -> tuple[dict[str, list], dict]:
    """Drop empty sentences, check each has a tag per word, normalise to IOB2."""
    out = {"tokens": [], "tags": []}
    report = {"sentences": len(rows["tokens"]), "iob1_repaired": 0, "empty": 0}
    for number, (words, tags) in enumerate(zip(rows["tokens"], rows["tags"]), 1):
        if len(words) != len(tags):
            raise PeftlabError(f"{where_}: sentence {number} has {len(words)} tokens and "
                               f"{len(tags)} tags")
        if not words:
            report["empty"] += 1
            continue
        for tag in tags:
            _check_tag(tag, f"{where_}: sentence {number}")
        tags, changed = to_iob2(tags)
        report["iob1_repaired"] += changed
        out["tokens"].append(words)
        out["tags"].append(tags)
    report["words"] = sum(len(words) for words in out["tokens"])
    return out, report


def tag_vocabulary(train_tags: list[list[str]]) -> list[str]:
    """O first, then each type's tags together (B, I, E, S order)."""
    present = {tag for tags in train_tags for tag in tags} - {OUTSIDE}
    return [OUTSIDE] + sorted(present, key=lambda t: (t[2:], "BIES".index(t[0])))


def _split_off(rows: dict[str, dict], recipe: Recipe, report: dict) -> dict[str, dict]:
    """Missing validation/test: seeded random sentences of train, in the recipe's ratios."""
    for split, share in missing_split_shares(rows, recipe).items():
        train = rows["train"]
        count = int(len(train["tokens"]) * share)
        if count < 1:
            raise PeftlabError(f"data.train: too few sentences ({len(train['tokens'])}) to "
                               f"split off a {split} set; give data.{split}")
        order = list(range(len(train["tokens"])))
        random.Random(recipe.train.seed).shuffle(order)
        taken, kept = sorted(order[:count]), sorted(order[count:])
        rows[split] = {k: [v[i] for i in taken] for k, v in train.items()}
        rows["train"] = {k: [v[i] for i in kept] for k, v in train.items()}
        report[split] = {"split_from_train": count}
    if "validation" not in rows:
        raise PeftlabError("data: no validation split; give data.validation or a non-zero "
                           "data.split_ratios[1]")
    return rows


def _to_ids(rows: dict, names: list[str], where_: str) -> dict:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for tags in rows["tags"]:
        for tag in tags:
            if tag not in index:
                raise PeftlabError(f"{where_}: tag '{tag}' does not occur in train "
                                   f"(train tags: {', '.join(names)})")
        ids.append([index[tag] for tag in tags])
    return {"tokens": rows["tokens"], "tags": ids}


def load_tagged_data(recipe: Recipe) -> TaggedData:
    """Read, check, normalise and split the recipe's sentences; tags named from train."""
    rows, report = {}, {}
    for split in SPLITS:
        value = getattr(recipe.data, split) or (recipe.data.train if split != "train" and
                                                 _is_folder(recipe) else None)
        if not value:
            continue
        found = read_tagged(value, recipe, split)
        if found is not None:
            rows[split], report[split] = _clean(found, where(recipe, split))
    if not rows.get("train", {}).get("tokens"):
        raise PeftlabError(f"{where(recipe, 'train')}: no sentences")
    names = tag_vocabulary(rows["train"]["tags"])
    if len(names) < 2:
        raise PeftlabError(f"{where(recipe, 'train')}: every tag is O; nothing to learn")
    rows = _split_off(rows, recipe, report)
    ids = {s: _to_ids(r, names, where(recipe, s)) for s, r in rows.items()}
    splits = limited_splits(ids, recipe, report)
    return TaggedData(splits=splits, tag_names=names, report=report)


def _is_folder(recipe: Recipe) -> bool:
    """A `datasets` folder or hub dataset as train brings its own evaluation splits."""
    path = resolve_data_path(recipe.data.train, recipe)
    return Path(path).is_dir() or recipe.data.format in ("disk", "hub")


def format_report(data: TaggedData) -> str:
    types = sorted({name[2:] for name in data.tag_names if name != OUTSIDE})
    header = f"tags ({len(data.tag_names)}, types {', '.join(types)}): "
    lines = [header + ", ".join(data.tag_names)]
    for split in SPLITS:
        info = data.report.get(split)
        if not info:
            continue
        if "split_from_train" in info:
            lines.append(f"{split}: {info['used']} sentences (split off train, seeded)")
            continue
        extra = [f"{info['empty']} empty dropped"] if info.get("empty") else []
        if info.get("iob1_repaired"):
            extra.append(f"{info['iob1_repaired']} IOB1 tags made IOB2")
        lines.append(f"{split}: {info['sentences']} sentences, {info['words']} words, "
                     f"{info['used']} used" + (f" ({'; '.join(extra)})" if extra else ""))
    return "\n".join(lines)


def load_eval_file(path: str, recipe: Recipe, tag_names: list[str]) -> datasets.DatasetDict:
    """A tagged file scored against a finished run's tag set."""
    found = read_tagged(path, recipe, "test")
    if found is None:
        raise PeftlabError(f"{path}: no test split")
    rows, _ = _clean(found, path)
    return datasets.DatasetDict({"eval": datasets.Dataset.from_dict(
        _to_ids(rows, tag_names, path))})
