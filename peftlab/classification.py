"""Text classification as a Task: labelled data, a classifier head, accuracy/F1 metrics."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DataCollatorWithPadding

from peftlab.artifacts import save_trained
from peftlab.batches import IGNORE, make_loader
from peftlab.config import Recipe
from peftlab.data import (
    format_report,
    format_unknown_tokens,
    load_labelled_data,
    tokenize_splits,
    unknown_token_rate,
)
from peftlab.metrics import evaluate_split
from peftlab.models import load_classifier, resolve_model_path
from peftlab.strategies import PEFT_KINDS, apply_strategy
from peftlab.task import Task


def summed_cross_entropy(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over the batch; the loop divides by the examples of the step."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")


def count_examples(batch: dict) -> torch.Tensor:
    """Examples with a label (padding examples that even out processes have none)."""
    return (batch["labels"] != IGNORE).sum()


def prepare_classification(recipe: Recipe, say) -> Task:
    """Read and label the data, load the classifier, apply the strategy, build batches."""
    data = load_labelled_data(recipe)
    say(format_report(data))
    model, tokenizer, pooling = load_classifier(recipe, data.label_names)
    report = apply_strategy(model, recipe)
    say(f"strategy {recipe.strategy.kind} (pooling {pooling}): {report.describe()}")
    tokenized = tokenize_splits(data.splits, tokenizer, recipe.model.max_length)
    if unknown := format_unknown_tokens(unknown_token_rate(tokenized["train"], tokenizer),
                                        recipe.model.name):
        say(unknown)
    train = recipe.train
    collate = DataCollatorWithPadding(tokenizer)
    loaders = {split: make_loader(tokenized[split],
                                  train.batch_size if split == "train" else recipe.eval.batch_size,
                                  collate=collate, train=split == "train", seed=train.seed,
                                  group_by_length=train.group_by_length)
               for split in tokenized}

    def evaluate(model, loader, accelerator, final=False):
        hub = recipe.eval.hub_metrics if final else []
        return evaluate_split(model, loader, accelerator, data.label_names, hub)

    def save(unwrapped: nn.Module, run_dir: Path, precision: str) -> None:
        save_trained(unwrapped, tokenizer, run_dir, pooling=pooling,
                     peft=recipe.strategy.kind in PEFT_KINDS, label_names=data.label_names,
                     base_path=resolve_model_path(recipe.model.name, recipe), precision=precision)

    return Task(report=report, loaders=loaders,
                batch_loss=summed_cross_entropy, count_items=count_examples,
                evaluate=evaluate, save=save, default_metric="f1_macro",
                history_keys=("accuracy", "f1_macro", "loss"),
                summary={"pooling": pooling, "labels": data.label_names})

