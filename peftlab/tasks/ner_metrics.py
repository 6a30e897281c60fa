"""Entity-level scores with seqeval's semantics, and words -> entity spans for predict.

seqeval (the library behind HF's `seqeval` metric and conlleval's rules) decides what an
entity is: a span counts only when its type and both ends match the gold span.
"""

from __future__ import annotations

from seqeval.metrics import accuracy_score, classification_report


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Micro precision/recall/F1 over entities, the same per type, and word accuracy."""
    if not any(tag != "O" for tags in gold for tag in tags) and \
            not any(tag != "O" for tags in predicted for tag in tags):
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "per_type": {},
                "accuracy": accuracy_score(gold, predicted) if gold else 0.0}
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    for average in ("macro avg", "weighted avg"):
        report.pop(average, None)
    return {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "f1": float(micro["f1-score"]), "accuracy": float(accuracy_score(gold, predicted)),
            "per_type": {kind: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                                "f1": float(v["f1-score"]), "support": int(v["support"])}
                         for kind, v in sorted(report.items())}}


def words_to_entities(text: str, words: list[list]) -> list[dict]:
    """[tag, probability, start, end] per word -> entities with their character span in
    `text` and the mean probability of their words. B-/S- open an entity, I-/E- continue
    one of the same type (or open one, as seqeval reads a stray I-), O and E- close it."""
    entities: list[dict] = []
    current: dict | None = None
    for tag, prob, start, end in words:
        prefix, kind = (tag[0], tag[2:]) if tag != "O" else ("O", "")
        continues = current is not None and current["entity"] == kind and prefix in "IE"
        if not continues:
            current = None
            if prefix != "O":
                current = {"entity": kind, "start": start, "end": end, "probs": []}
                entities.append(current)
        if current is not None:
            current["end"] = end
            current["probs"].append(prob)
            if prefix in "ES":
                current = None
    return [{"entity": e["entity"], "text": text[e["start"]:e["end"]], "start": e["start"],
             "end": e["end"], "score": round(sum(e["probs"]) / len(e["probs"]), 6)}
            for e in entities]
