"""The contract between a task (classification, causal LM) and the generic training loop.

A task module turns a recipe into a `Task`: the model with its strategy applied, the batches,
and three functions the loop calls. The loop never asks which task it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from peftlab.strategies import StrategyReport


@dataclass
class Task:
    report: StrategyReport  # report.model is the model with its strategy applied
    loaders: dict[str, DataLoader]  # train, validation and maybe test, before prepare()
    # (model, batch) -> summed loss over the batch's items (examples or target tokens)
    batch_loss: Callable[[nn.Module, dict], torch.Tensor]
    # batch -> number of items the loss sums over; normalises across accumulation/processes
    count_items: Callable[[dict], torch.Tensor]
    # (model, loader, accelerator, final) -> metrics dict of one split (`final`: add details)
    evaluate: Callable[..., dict]
    # (unwrapped model, run folder, precision trained in) -> writes the trained weights and
    # peftlab.json; main process only
    save: Callable[[nn.Module, Path, str], None]
    default_metric: str  # metric_for_best when the recipe says auto
    history_keys: tuple[str, ...]  # eval metrics kept in summary.json's history
    summary: dict = field(default_factory=dict)  # task facts for summary.json
    # (model, accelerator, step, run_dir) -> called after each evaluation (e.g. samples)
    on_evaluate: Callable[..., None] | None = None
    # (accelerator, run folder, say) -> runs the frozen bottom once and makes the loaders and
    # loss use its cached outputs (train.cache_frozen); None where the task cannot cache,
    # e.g. inputs that change every epoch (augmentation)
    cache_frozen: Callable[..., None] | None = None


def micro_batch_groups(loader, size: int):
    """Batches in groups of `size` (the last may be shorter): one optimizer step each."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
