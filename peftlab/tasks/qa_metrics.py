"""SQuAD scoring and answer extraction: logits of every window -> one answer per question.

Exact match and F1 follow the official SQuAD v1.1/v2.0 script: lower-case, drop
punctuation and the articles a/an/the, collapse whitespace; F1 over the tokens shared with
the best-matching gold answer. Written here because evaluate's `squad` metric is a Hub
script (offline it cannot load). One addition: a token holding CJK characters is split into
characters (the CMRC 2018 script's mixed segmentation), so Chinese answers get a real F1
instead of 0/1 on whole sentences; English text has no such tokens and scores exactly as
SQuAD's script.
"""

from __future__ import annotations

import collections
import re
import string

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
PUNCTUATION = set(string.punctuation) | set("，。！？；：、「」『』（）《》〈〉“”‘’—…·")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    tokens = []
    for token in normalize_answer(text).split():
        tokens += list(token) if CJK.search(token) else [token]
    return tokens


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted, wanted = answer_tokens(prediction), answer_tokens(gold)
    if not predicted or not wanted:  # unanswerable: right only when both are empty
        return float(predicted == wanted)
    common = collections.Counter(predicted) & collections.Counter(wanted)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict:
    """EM and F1 in percent over questions, each against its best gold answer (an empty gold
    list is unanswerable: the right prediction is ""); v2's HasAns/NoAns parts when both
    kinds occur."""
    def best(metric, prediction, answers):
        return max(metric(prediction, gold) for gold in (answers or [""]))

    exact = [best(exact_match, p, g) for p, g in zip(predictions, golds)]
    overlap = [best(f1, p, g) for p, g in zip(predictions, golds)]
    count = max(len(exact), 1)
    result = {"exact_match": 100 * sum(exact) / count, "f1": 100 * sum(overlap) / count,
              "questions": len(exact)}
    has = [i for i, g in enumerate(golds) if g]
    if len(has) < len(golds):
        no = [i for i, g in enumerate(golds) if not g]
        for name, part in (("HasAns", has), ("NoAns", no)):
            if part:
                result[f"{name}_exact"] = 100 * sum(exact[i] for i in part) / len(part)
                result[f"{name}_f1"] = 100 * sum(overlap[i] for i in part) / len(part)
                result[f"{name}_total"] = len(part)
    return result


def best_span(start_logits, end_logits, offsets, n_best: int, max_answer_length: int):
    """(score, start char, end char, start index, end index) of the best span of one window:
    the n_best starts and ends (context tokens only, end not before start, at most
    max_answer_length tokens), scored by start + end logit; None when no span is valid."""
    starts = sorted(range(len(start_logits)), key=lambda i: -start_logits[i])[:n_best]
    ends = sorted(range(len(end_logits)), key=lambda i: -end_logits[i])[:n_best]
    best = None
    for s in starts:
        for e in ends:
            if offsets[s][0] < 0 or offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            score = start_logits[s] + end_logits[e]
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1], s, e)
    return best
