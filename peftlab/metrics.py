"""What every task's metrics share: which direction is better, and the console line."""

from __future__ import annotations

# metrics where a smaller value is the better model; every other metric grows with quality
LOWER_IS_BETTER = ("loss", "perplexity")


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` of `metric` improves on `best` (None: nothing to beat yet)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


SUMMARY_KEYS = ("f1", "precision", "recall", "exact_match", "accuracy", "f1_macro",
                "precision_macro", "recall_macro", "f1_weighted", "loss", "perplexity")


def format_metrics(name: str, metrics: dict) -> str:
    """One line of the headline numbers, for the console."""
    parts = [f"{k}={metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics]
    return f"{name}: " + " ".join(parts)
