"""Classification predictions -> metrics, through `evaluate`, offline by default.

The built-in metric set is a local evaluate module shipped in the package (the Hub's
"accuracy" script cannot be fetched offline). Extra hub metrics named in the recipe are
loaded by name for users who are online.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from peftlab.errors import PeftlabError

LOCAL_MODULE = Path(__file__).parent.parent / "metric_modules" / "peftlab_classification.py"


@cache
def _load_metric(name: str):
    import evaluate
    try:
        return evaluate.load(str(LOCAL_MODULE) if name == "builtin" else name)
    except Exception as err:  # noqa: BLE001 - network or hub failures are the user's setup
        raise PeftlabError(f"eval.hub_metrics: could not load metric '{name}' "
                           f"({str(err).splitlines()[0][:200]})") from None


def classification_metrics(predictions: list[int], references: list[int],
                           label_names: list[str], hub_metrics: list[str] = ()) -> dict:
    """Accuracy, P/R/F1 (macro and weighted), per-class report, confusion matrix (+ extras)."""
    result = _load_metric("builtin").compute(predictions=predictions, references=references,
                                             label_names=label_names)
    for name in hub_metrics:
        extra = _load_metric(name).compute(predictions=predictions, references=references)
        result |= {k: v for k, v in extra.items() if k not in result}
    return result


@torch.inference_mode()
def predict_logits(model, loader, accelerator,
                   forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader, gathered across processes without duplicates.
    `forward(model, inputs) -> logits` replaces the plain call (cached frozen features)."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        labels = batch.pop("labels", None)
        logits = (forward(model, batch) if forward else model(**batch).logits).float()
        if labels is None:
            labels = torch.full((logits.shape[0],), -1, device=logits.device)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate_split(model, loader, accelerator, label_names: list[str],
                   hub_metrics: list[str] = (), forward=None) -> dict:
    """Metrics of one split plus its mean loss (cross-entropy of the gathered logits)."""
    logits, labels = predict_logits(model, loader, accelerator, forward)
    result = classification_metrics(logits.argmax(-1).tolist(), labels.tolist(), label_names,
                                    list(hub_metrics))
    result["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    result["examples"] = int(labels.numel())
    return result
