"""Text classification as a Task: labelled data, a classifier head, accuracy/F1 metrics."""

from __future__ import annotations

import time
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
from peftlab.frozen_cache import (
    Boundary,
    cache_loaders,
    cache_pays,
    find_boundary,
    forward_logits,
    refuse,
)
from peftlab.metrics import evaluate_split
from peftlab.models import load_classifier, resolve_model_path
from peftlab.strategies import PEFT_KINDS, apply_strategy
from peftlab.task import Task


def summed_cross_entropy(model: nn.Module, batch: dict,
                         boundary: Boundary | None = None) -> torch.Tensor:
    """Cross-entropy summed over the batch; the loop divides by the examples of the step."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = forward_logits(model, inputs, boundary)
    return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")


def caching_frozen(recipe: Recipe, model: nn.Module, loaders: dict, say) -> Boundary | None:
    """Where to cut for train.cache_frozen, or None to run uncached (auto says why)."""
    setting, kind = recipe.train.cache_frozen, recipe.strategy.kind
    if setting is False:
        return None
    boundary = find_boundary(model, kind, recipe.strategy.freeze_layers)
    if boundary is None:
        if setting is True:
            raise refuse(f"strategy {kind} trains below every layer boundary (only head, "
                         f"and freeze with freeze_layers >= 1, have a frozen bottom)")
        return None
    if setting == "auto" and not cache_pays(recipe, len(loaders["train"])):
        say("train.cache_frozen auto: off, the frozen layers would run once over each split "
            "anyway")
        return None
    return boundary


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

    cached: dict[str, Boundary | None] = {"boundary": None}

    def logits(model, inputs):
        return forward_logits(model, dict(inputs), cached["boundary"])

    def evaluate(model, loader, accelerator, final=False):
        hub = recipe.eval.hub_metrics if final else []
        return evaluate_split(model, loader, accelerator, data.label_names, hub, logits)

    def batch_loss(model, batch):
        return summed_cross_entropy(model, batch, cached["boundary"])

    def cache_frozen(accelerator, run_dir: Path, say) -> None:
        tick = time.perf_counter()
        boundary = caching_frozen(recipe, report.model, loaders, say)
        if boundary is not None:
            loaders.update(cache_loaders(report.model, boundary, loaders, accelerator,
                                         run_dir, say))
            cached["boundary"] = boundary
        summary["cache_frozen"] = boundary is not None
        # the frozen pass runs before the loop's clock starts: reported beside it
        summary["cache_seconds"] = round(time.perf_counter() - tick, 2) if boundary else 0.0

    def save(unwrapped: nn.Module, run_dir: Path, precision: str) -> None:
        save_trained(unwrapped, tokenizer, run_dir, pooling=pooling,
                     peft=recipe.strategy.kind in PEFT_KINDS, label_names=data.label_names,
                     base_path=resolve_model_path(recipe.model.name, recipe), precision=precision)

    summary = {"pooling": pooling, "labels": data.label_names}
    return Task(report=report, loaders=loaders,
                batch_loss=batch_loss, count_items=count_examples,
                evaluate=evaluate, save=save, default_metric="f1_macro",
                history_keys=("accuracy", "f1_macro", "loss"),
                summary=summary, cache_frozen=cache_frozen)

