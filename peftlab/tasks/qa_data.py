"""Extractive-QA data: questions over contexts with answer spans, checked, and split by
article so no paragraph lands in two splits.

Sources are SQuAD v1.1 / v2.0 JSON (`data[].paragraphs[].qas[]`; a v2 question marked
`is_impossible` is unanswerable, its `plausible_answers` are not gold and are not read), or
flat CSV/JSONL/Parquet rows with
question, context, answer text and answer start (an empty answer text is unanswerable).
Every answer's start must point at its text. A start that is off only because of
whitespace (a shifted offset, or spaces collapsed in the text) is repaired and counted;
anything else is a one-line error naming the question.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from peftlab.config import Recipe, resolve_data_path
from peftlab.data import SPLITS, limited_splits, missing_split_shares, where
from peftlab.errors import PeftlabError
from peftlab.sources import pick_split, read_source

SEARCH_CHARS = 50  # how far a whitespace-shifted answer start is looked for


@dataclass
class QaData:
    """Splits with columns id, title, question, context, answer_text (list), answer_start
    (list, character offsets); an empty list is an unanswerable question."""

    splits: datasets.DatasetDict
    report: dict = field(default_factory=dict)


def _squad_rows(path: str) -> dict[str, list] | None:
    """Rows of a SQuAD-format JSON file, or None when the file is not one."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return None
    rows: dict[str, list] = {k: [] for k in ("id", "title", "question", "context",
                                             "answer_text", "answer_start")}
    try:
        for number, article in enumerate(document["data"]):
            title = str(article.get("title") or article.get("id") or f"article-{number}")
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers") or []
                    rows["id"].append(str(qa["id"]))
                    rows["title"].append(title)
                    rows["question"].append(qa["question"])
                    rows["context"].append(paragraph["context"])
                    rows["answer_text"].append([a["text"] for a in answers])
                    rows["answer_start"].append([int(a["answer_start"]) for a in answers])
    except (KeyError, TypeError) as err:
        raise PeftlabError(f"{path}: not SQuAD JSON (missing {err} in data[].paragraphs[]"
                           f".qas[])") from None
    return rows


def _flat_rows(source: datasets.Dataset, recipe: Recipe, where_: str) -> dict[str, list]:
    data = recipe.data
    wanted = {"question_column": data.question_column, "context_column": data.context_column,
              "answer_column": data.answer_column,
              "answer_start_column": data.answer_start_column}
    for key, column in wanted.items():
        if column not in source.column_names:
            raise PeftlabError(f"{where_}: no column '{column}' (columns: "
                               f"{', '.join(source.column_names)}); map it with data.{key}")
    texts, starts = source[data.answer_column], source[data.answer_start_column]
    count = len(source)
    ids = source[data.id_column] if data.id_column in source.column_names else \
        [f"row-{i + 1}" for i in range(count)]
    titles = source[data.title_column] if data.title_column in source.column_names else \
        source[data.context_column]  # without titles, each context is its own group
    empty = [text is None or str(text) == "" for text in texts]
    return {"id": list(map(str, ids)), "title": list(map(str, titles)),
            "question": list(map(str, source[data.question_column])),
            "context": list(map(str, source[data.context_column])),
            "answer_text": [[] if e else [str(t)] for t, e in zip(texts, empty)],
            "answer_start": [[] if e else [int(s)] for s, e in zip(starts, empty)]}


def read_questions(value: str, recipe: Recipe, split: str) -> dict[str, list] | None:
    path = resolve_data_path(value, recipe)
    if Path(path).suffix.lower() == ".json" and Path(path).is_file():
        rows = _squad_rows(path)
        if rows is not None:
            return rows
    source = read_source(path, recipe.data.format, recipe.data.question_column,
                         recipe.data.answer_column)
    if isinstance(source, datasets.DatasetDict):
        source = pick_split(source, split, path)
        if source is None:
            return None
    return _flat_rows(source, recipe, f"data.{split} ({path})")


def _squashed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def align_answer(context: str, text: str, start: int) -> tuple[int, str, bool] | None:
    """(start, text, repaired) of an answer inside its context, or None when it is not
    there. A start off by whitespace, or text whose spaces differ from the context's, is
    found again near the given start."""
    if context[start:start + len(text)] == text:
        return start, text, False
    window = range(max(0, start - SEARCH_CHARS), min(len(context), start + SEARCH_CHARS) + 1)
    stripped = text.strip()
    if stripped:
        hits = [i for i in window if context.startswith(stripped, i)]
        if hits:
            best = min(hits, key=lambda i: abs(i - start))
            return best, stripped, True
    squashed = _squashed(text)
    if squashed:
        pattern = re.compile(r"\s+".join(map(re.escape, squashed.split(" "))))
        for i in sorted(window, key=lambda i: abs(i - start)):
            found = pattern.match(context, i)
            if found:
                return i, found.group(0), True
    return None


def _clean(rows: dict[str, list], where_: str,
           drop_bad: bool = False) -> tuple[dict[str, list], dict]:
    """Questions with their answers found in the context (repaired where only whitespace is
    off); a misplaced answer is an error, or with data.bad_answers: drop, left out (and a
    question whose every answer is misplaced too)."""
    report = {"questions": len(rows["id"]), "repaired": 0, "unanswerable": 0, "dropped": 0,
              "bad_answers": 0, "bad_questions": 0}
    out: dict[str, list] = {k: [] for k in rows}
    for i in range(len(rows["id"])):
        question, context = rows["question"][i].strip(), rows["context"][i]
        if not question or not context.strip():
            report["dropped"] += 1
            continue
        texts, starts = [], []
        for text, start in zip(rows["answer_text"][i], rows["answer_start"][i]):
            found = align_answer(context, text, start)
            if found is None and drop_bad:
                report["bad_answers"] += 1
                continue
            if found is None:
                raise PeftlabError(f"{where_}: question {rows['id'][i]}: answer "
                                   f"{text[:60]!r} is not at answer_start {start} of its "
                                   f"context (there: {context[start:start + len(text)][:60]!r}); "
                                   f"fix it, or set data.bad_answers: drop")
            starts.append(found[0])
            texts.append(found[1])
            report["repaired"] += found[2]
        if not texts and rows["answer_text"][i]:  # every answer was misplaced
            report["bad_questions"] += 1
            continue
        report["unanswerable"] += not texts
        for key, value in (("id", rows["id"][i]), ("title", rows["title"][i]),
                           ("question", question), ("context", context),
                           ("answer_text", texts), ("answer_start", starts)):
            out[key].append(value)
    return out, report


def _split_by_article(rows: dict, recipe: Recipe, report: dict) -> dict:
    """Missing validation/test: whole articles (titles), seeded, in the recipe's ratios of
    questions, so no paragraph is in two splits."""
    for split, share in missing_split_shares(rows, recipe).items():
        train = rows["train"]
        titles = sorted(set(train["title"]))
        random.Random(recipe.train.seed).shuffle(titles)
        wanted, taken = share * len(train["id"]), set()
        per_title = {t: train["title"].count(t) for t in titles}
        for title in titles:
            if sum(per_title[t] for t in taken) >= wanted or len(taken) == len(titles) - 1:
                break
            taken.add(title)
        if not taken:
            raise PeftlabError(f"data.train: too few articles ({len(titles)}) to split off a "
                               f"{split} set; give data.{split}")
        chosen = [i for i, t in enumerate(train["title"]) if t in taken]
        kept = [i for i, t in enumerate(train["title"]) if t not in taken]
        rows[split] = {k: [v[i] for i in chosen] for k, v in train.items()}
        rows["train"] = {k: [v[i] for i in kept] for k, v in train.items()}
        report[split] = {"split_from_train": len(chosen), "articles": len(taken)}
    if "validation" not in rows:
        raise PeftlabError("data: no validation split; give data.validation or a non-zero "
                           "data.split_ratios[1]")
    return rows


def load_qa_data(recipe: Recipe) -> QaData:
    rows, report = {}, {}
    for split in SPLITS:
        value = getattr(recipe.data, split)
        if not value:
            continue
        found = read_questions(value, recipe, split)
        if found is not None:
            rows[split], report[split] = _clean(found, where(recipe, split),
                                                recipe.data.bad_answers == "drop")
    if not rows.get("train", {}).get("id"):
        raise PeftlabError(f"{where(recipe, 'train')}: no questions")
    rows = _split_by_article(rows, recipe, report)
    splits = limited_splits(rows, recipe, report)
    return QaData(splits=splits, report=report)


def format_report(data: QaData) -> str:
    lines = []
    for split in SPLITS:
        info = data.report.get(split)
        if not info:
            continue
        if "split_from_train" in info:
            lines.append(f"{split}: {info['used']} questions ({info['articles']} articles "
                         f"split off train, seeded)")
            continue
        extra = [f"{info[k]} {label}" for k, label in (
            ("repaired", "answer starts repaired (whitespace)"),
            ("unanswerable", "unanswerable"), ("dropped", "empty dropped"),
            ("bad_answers", "misplaced answers dropped"),
            ("bad_questions", "questions without a placed answer dropped")) if info.get(k)]
        lines.append(f"{split}: {info['questions']} questions, {info['used']} used"
                     + (f" ({'; '.join(extra)})" if extra else ""))
    return "\n".join(lines)


def load_eval_file(path: str, recipe: Recipe) -> datasets.DatasetDict:
    found = read_questions(path, recipe, "test")
    if found is None:
        raise PeftlabError(f"{path}: no test split")
    rows, _ = _clean(found, path, recipe.data.bad_answers == "drop")
    return datasets.DatasetDict({"eval": datasets.Dataset.from_dict(rows)})
