"""Cached frozen features: run what never trains once, then train on its outputs.

`head` freezes the whole body and `freeze` the bottom N layers, yet a plain loop runs them
again every epoch and at every evaluation, on the same inputs. Here the frozen bottom runs
once per split, in eval mode (no dropout) and the run's precision, and its outputs are kept:
- `pooled`: our mean-pool head under `head`: one vector per example;
- `layer`: the output of the last frozen layer, one vector per real token (variable length,
  padded per batch like the token ids; length-grouped batches keep working).
Training and evaluation then call the model as usual, with the frozen layers swapped for
pass-throughs and the last one answering from the cache, so the model, its saved weights and
`predict` on raw text are exactly the uncached ones. The cache lives in memory when it fits
in half the available memory, else in a memory-mapped file under the run folder that is
unlinked at once (nothing is left behind, even after a crash).
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from peftlab.errors import PeftlabError
from peftlab.strategies import embedding_params, layer_stack

FEATURES = "frozen_features"


@dataclass
class Boundary:
    kind: str  # "pooled" (the mean-pooled vector) or "layer" (output of layer `layer` - 1)
    layer: int = 0  # layers below this index are frozen and cached


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def find_boundary(model: nn.Module, kind: str, freeze_layers: int) -> Boundary | None:
    """Where the frozen bottom ends for this strategy, or None when nothing below a layer
    boundary is wholly frozen (LoRA, gradual, full, freeze of 0 layers)."""
    if kind == "head" and hasattr(model, "pool"):
        return Boundary("pooled")
    layers = layer_stack(model)
    count = len(layers) if kind == "head" else freeze_layers if kind == "freeze" else 0
    if count <= 0:
        return None
    below = [*embedding_params(model), *(p for layer in list(layers)[:count]
                                         for p in layer.parameters())]
    return Boundary("layer", count) if not any(p.requires_grad for p in below) else None


def feature_bytes(lengths: list[int], width: int, boundary: Boundary, element: int) -> int:
    rows = len(lengths) if boundary.kind == "pooled" else sum(lengths)
    return rows * width * element


def cache_bytes(lengths: dict[str, list[int]], width: int, boundary: Boundary,
                train_element: int, eval_element: int) -> int:
    """Every split's features: train in the run's precision, evaluation splits in what the
    frozen layers produce (see fill_store): bf16 from a bf16-stored base, else fp32 (autocast
    ends a fp32 body's layers in fp32 norms). The planner counts the same bytes before a run."""
    return sum(feature_bytes(split_lengths, width, boundary,
                             train_element if split == "train" else eval_element)
               for split, split_lengths in lengths.items())


def fits_in_memory(needed: int) -> bool:
    """In memory when the cache takes at most half the available memory, else memory-mapped."""
    return needed <= memory_available() // 2


class _FeaturesReached(Exception):
    """Raised by the capture hook: nothing above the boundary needs to run."""


def _capture(model: nn.Module, boundary: Boundary, inputs: dict) -> torch.Tensor:
    if boundary.kind == "pooled":
        return model.pool(**inputs)
    kept = {}

    def keep(module, args, output):
        kept["features"] = output[0] if isinstance(output, tuple) else output
        raise _FeaturesReached

    handle = layer_stack(model)[boundary.layer - 1].register_forward_hook(keep)
    try:
        model(**inputs)
    except _FeaturesReached:
        pass
    finally:
        handle.remove()
    return kept["features"]


def _passthrough(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def bottom_replaced(model: nn.Module, boundary: Boundary, features: torch.Tensor):
    """The frozen layers do nothing and the last of them returns the cached features, so
    the model's own forward runs only what is above (embeddings are a cheap lookup)."""
    layers = list(layer_stack(_inner(model)))[:boundary.layer]
    for layer in layers[:-1]:
        layer.forward = _passthrough
    layers[-1].forward = lambda *args, **kwargs: features
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def forward_logits(model: nn.Module, inputs: dict, boundary: Boundary | None) -> torch.Tensor:
    """The model's logits for a batch, from cached features when the batch carries them."""
    features = inputs.pop(FEATURES, None)
    if features is None:
        return model(**inputs).logits
    if boundary.kind == "pooled":
        return model(**inputs, pooled=features).logits
    with bottom_replaced(model, boundary, features):
        return model(**inputs).logits


class FeatureStore:
    """Per-example features: rows of one (rows x width) tensor, in memory or memory-mapped."""

    def __init__(self, lengths: list[int], width: int, dtype: torch.dtype, boundary: Boundary,
                 folder: Path | None):
        self.pooled = boundary.kind == "pooled"
        self.offsets = [0, *accumulate([1] * len(lengths) if self.pooled else lengths)]
        rows = self.offsets[-1]
        if folder is None:
            self.data = torch.empty(rows, width, dtype=dtype)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=folder, suffix=".features")
            os.close(handle)
            itemsize = torch.empty((), dtype=dtype).element_size()
            with open(name, "wb") as file:
                file.truncate(max(rows * width * itemsize, 1))
            storage = torch.from_file(name, shared=True, size=rows * width, dtype=dtype)
            os.unlink(name)  # the mapping stays valid; the file goes when the process does
            self.data = storage.view(rows, width)

    def put(self, index: int, values: torch.Tensor) -> None:
        self.data[self.offsets[index]:self.offsets[index + 1]] = values.reshape(-1,
                                                                                 values.shape[-1])

    def get(self, index: int) -> torch.Tensor:
        rows = self.data[self.offsets[index]:self.offsets[index + 1]]
        return rows[0] if self.pooled else rows


class _WithFeatures(Dataset):
    def __init__(self, dataset, store: FeatureStore):
        self.dataset, self.store = dataset, store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], FEATURES: self.store.get(index)}


def _collate_with_features(inner):
    """The task's collate, then the features: stacked (pooled) or scattered onto the real
    tokens of the padded batch (its attention mask says where, left or right padding)."""
    def collate(examples: list[dict]) -> dict:
        features = [example.pop(FEATURES) for example in examples]
        batch = inner(examples)
        if features[0].dim() == 1:
            batch[FEATURES] = torch.stack(features)
            return batch
        mask = batch["attention_mask"].bool()
        padded = features[0].new_zeros(*mask.shape, features[0].shape[-1])
        padded[mask] = torch.cat(features)
        batch[FEATURES] = padded
        return batch
    return collate


@torch.inference_mode()
def fill_store(model: nn.Module, boundary: Boundary, loader: DataLoader,
               lengths: list[int], accelerator, folder: Path | None,
               run_precision: bool = False) -> FeatureStore:
    """One eval-mode pass of the frozen bottom over a split, longest first. `run_precision`
    (train): stored in the run's precision, since under bf16 autocast a fp32 body's layers
    end in fp32 norms and keeping those would double the largest cache. Evaluation splits
    keep what the layers produce, so a run's metrics are exactly what `peftlab eval` and
    `predict` compute on the saved model, which runs uncached."""
    dataset = loader.dataset
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch_size = max(loader.batch_size or 1, 1)
    store = None
    model.eval()
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = loader.collate_fn([dataset[i] for i in indices])
        inputs = {k: v.to(accelerator.device) for k, v in batch.items() if k != "labels"}
        with accelerator.autocast():
            features = _capture(model, boundary, inputs).cpu()
        if store is None:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                accelerator.mixed_precision, features.dtype) if run_precision \
                else features.dtype
            store = FeatureStore(lengths, features.shape[-1], dtype, boundary, folder)
        for row, index in enumerate(indices):
            store.put(index, features[row] if boundary.kind == "pooled" else
                      features[row][batch["attention_mask"][row].bool()])
    return store


def cache_loaders(model: nn.Module, boundary: Boundary, loaders: dict[str, DataLoader],
                  accelerator, run_dir: Path, say) -> dict[str, DataLoader]:
    """Every split's loader, now carrying its features; in memory when they fit in half the
    available memory, else memory-mapped under the run folder."""
    lengths = {split: [len(ids) for ids in loader.dataset["input_ids"]]
               for split, loader in loaders.items()}
    base_element = next(layer_stack(model)[0].parameters()).element_size()
    needed = cache_bytes(lengths, model.config.hidden_size, boundary,
                         4 if accelerator.mixed_precision == "no" else 2, base_element)
    folder = None if fits_in_memory(needed) else run_dir / "frozen_cache"
    model.to(accelerator.device)
    cached = {split: with_features(loader, fill_store(
        model, boundary, loader, lengths[split], accelerator, folder,
        run_precision=split == "train")) for split, loader in loaders.items()}
    model.train()
    say(f"frozen {'body' if boundary.kind == 'pooled' else f'{boundary.layer} layers'} run "
        f"once: {needed / 2**20:,.0f} MB of cached features "
        f"{'in memory' if folder is None else f'memory-mapped under {folder}'}")
    return cached


def with_features(loader: DataLoader, store: FeatureStore) -> DataLoader:
    """The same loader (order, batch size, generator) whose batches carry the features."""
    return DataLoader(_WithFeatures(loader.dataset, store), batch_size=loader.batch_size,
                      sampler=loader.sampler, collate_fn=_collate_with_features(
                          loader.collate_fn), drop_last=False, generator=loader.generator)


def memory_available() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cache_pays(recipe, train_batches: int) -> bool:
    """`auto`: the frozen bottom would run more than once over the same data: more than one
    epoch, or the validation split evaluated more than once."""
    cfg = recipe.train
    updates = max(math.ceil(train_batches / cfg.grad_accum), 1)
    steps = cfg.max_steps or math.ceil(cfg.epochs * updates)
    evaluations = (steps // cfg.eval_every_steps if cfg.eval_every_steps
                   else math.ceil(steps / updates)) + int(cfg.eval_at_start)
    return steps > updates or evaluations > 1


def refuse(reason: str) -> PeftlabError:
    return PeftlabError(f"train.cache_frozen: true, but {reason}; set it to auto or false")
