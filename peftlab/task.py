"""The contract between a task and the generic code: training loop, artifacts, CLI, planner.

Every module under peftlab/tasks/ meets `TaskModule`; `peftlab.tasks.TASKS` maps the
recipe's `model.task` to it. Its `prepare` turns a recipe into a `Task` (the model with its
strategy applied, the batches, and the functions the loop calls); its other functions load a
finished run back, score it, predict with it, and size it for the planner. No code outside
peftlab/tasks/ asks which task it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


class TaskModule(Protocol):
    """What a task module provides beside training (module-level names and functions)."""

    # a freshly initialised head that trains in every strategy (the planner counts it), as
    # opposed to a pretrained output layer (a causal LM's lm_head)
    NEW_HEAD: bool
    PIPELINE_TAG: str  # model card: the hub's pipeline_tag and model-index task type
    AUTO_CLASS: str  # model card: the transformers Auto class that loads it
    # model card: what prepares its inputs; optional, AutoTokenizer when absent
    # INPUTS_CLASS: str
    CARD_METRICS: tuple[str, ...]  # model card: the metrics.json keys of its model-index
    METRICS: tuple[str, ...]  # what train.metric_for_best may name (its evaluation's keys)
    # its `peftlab predict` options: (flags, argparse keywords); a flag two tasks share (--text)
    # is declared by the first and read by both
    PREDICT_OPTIONS: tuple[tuple[tuple[str, ...], dict], ...]

    def prepare(self, recipe, say) -> Task:
        """Read the data, build the model with its strategy, make the loaders."""

    def load(self, folder: Path, recipe, info: dict, dequantize: bool) -> tuple[nn.Module, Any]:
        """(model in eval mode, tokenizer) of a finished run's artifact folder."""

    def eval_loaders(self, recipe, tokenizer, info: dict,
                     data_file: str | None) -> tuple[dict[str, DataLoader], Callable]:
        """Loaders of the run's evaluation splits (or of one file), and the function that
        scores one: (model, loader, accelerator) -> metrics."""

    def predict(self, args, run_dir: Path, info: dict) -> None:
        """`peftlab predict` on a finished run: checks its own flags before loading."""

    def meta_model(self, config, recipe) -> nn.Module:
        """The model class this task trains, built on the meta device from `config`."""

    def plan_census(self, config, recipe):
        """Planner: a census.CensusSpec (meta inputs, loss, data bytes) where the model is
        sized by counting its saved tensors on the meta device (images: patches and feature
        maps); None where the closed-form transformer terms below apply."""

    # the closed-form terms (tasks whose plan_census returns None):
    def output_bytes(self, recipe, tokens: int, vocab: int, training: bool) -> float:
        """Planner: bytes of the task's outputs over `tokens` tokens (a causal LM's logits
        over the vocabulary; small for classifiers)."""

    def frozen_cache_bytes(self, recipe, kind: str, hidden: int, precision: str) -> float:
        """Planner: bytes train.cache_frozen would hold in memory under strategy `kind`
        (`precision` "no" or "bf16"); 0 where the task has no cache or would not use it."""

    def serve_routes(self, app, served, auth) -> None:
        """`peftlab serve`: add this task's endpoints to the FastAPI `app` (`served`: the
        loaded run, limits and batcher; `auth`: the bearer-key dependency)."""


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
