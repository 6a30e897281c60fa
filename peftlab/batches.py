"""Examples -> batches: seeded, resumable orders for training, fixed ones for evaluation,
and the padding that keeps several processes equal to one.

Tokenized splits come in; DataLoaders go out. Nothing here knows files or tasks, only that
an example's `labels` are ignored where they are -100 (both tasks' loss and item count
skip those).
"""

from __future__ import annotations

import math

import datasets
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler

IGNORE = -100  # a label the loss and the item count skip


class EpochSeededSampler(Sampler):
    """Epoch e's order depends only on (seed, e), never on how many epochs this process has
    already iterated, so a run resumed mid-way sees the same batches as an unbroken one.
    The training loop (and Accelerate's DataLoaderShard) call set_epoch before each pass;
    a `follower` (a dataset whose items depend on the epoch) is told too, since Accelerate
    reaches the sampler under every process layout but the dataset only under some."""

    def __init__(self, inner: Sampler, generator: torch.Generator, seed: int,
                 follower=None):
        self.inner, self.generator, self.seed, self.epoch = inner, generator, seed, 0
        self.follower = follower

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.follower is not None:
            self.follower.set_epoch(epoch)

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def make_loader(dataset: datasets.Dataset, batch_size: int, *, collate, train: bool,
                seed: int, group_by_length: bool = False) -> DataLoader:
    """Train order is seeded per epoch (optionally length-grouped). Evaluation goes longest
    first: every batch then pads to nearly its own length (SST-2 dev at batch 128: 25,416
    padded tokens instead of 46,064 in file order), and no metric depends on the order. `collate` pads each batch
    to its longest member. The loader has its own generator, so starting an iteration never
    draws from the global RNG that dropout uses: a resumed run and an unbroken one see the
    same dropout masks."""
    generator = torch.Generator().manual_seed(seed)
    sampler: Sampler | list[int]
    if train and group_by_length:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        sampler = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if train:
        sampler = EpochSeededSampler(sampler, generator, seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=False, generator=torch.Generator().manual_seed(seed))


class _WithIgnoredPadding(Dataset):
    """The dataset, plus index len(dataset): a copy of the first example whose labels are
    all ignored (it adds nothing to the loss or to the items the loss is divided by)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset) + 1

    def __getitem__(self, index: int) -> dict:
        if index < len(self.dataset):
            return self.dataset[index]
        example = dict(self.dataset[0])
        labels = example["labels"]
        example["labels"] = [IGNORE] * len(labels) if isinstance(labels, list) else IGNORE
        return example


class _PaddedSampler(Sampler):
    """The inner order, then as many ignored-example indices as make whole batches for every
    process. Accelerate would otherwise fill the last step by repeating the first examples,
    and 2 processes x batch 4 would train on examples that 1 process x batch 8 does not."""

    def __init__(self, inner: Sampler, padding_index: int, multiple: int):
        self.inner, self.padding_index, self.multiple = inner, padding_index, multiple

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        yield from self.inner
        yield from [self.padding_index] * (len(self) - len(self.inner))

    def __len__(self) -> int:
        return math.ceil(len(self.inner) / self.multiple) * self.multiple


def pad_for_processes(loader: DataLoader, processes: int) -> DataLoader:
    """A training loader whose every step is full on every process, the gaps filled with
    ignored examples: the step's loss and gradient are those of one process with the
    processes' batches together, also at the end of an epoch."""
    multiple = loader.batch_size * processes
    if processes == 1 or len(loader.sampler) % multiple == 0:
        return loader
    return DataLoader(_WithIgnoredPadding(loader.dataset), batch_size=loader.batch_size,
                      sampler=_PaddedSampler(loader.sampler, len(loader.dataset), multiple),
                      collate_fn=loader.collate_fn, drop_last=False,
                      generator=loader.generator)
