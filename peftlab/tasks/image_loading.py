"""Images -> model inputs: decode, augment (train only), then the model's own image processor.

Decoding and augmentation run in the DataLoader's worker processes (`data.workers`), so the
training loop is not waiting on JPEG decoding. Augmentation is torchvision's transforms v2
(random resized crop, horizontal flip, small rotation), never hand-written pixel code; the
processor (`AutoImageProcessor`: resize and normalise) is the same at train, evaluation,
predict and serve, so those never see augmented images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from peftlab.batches import EpochSeededSampler
from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.tasks.image_data import open_image


def processor_size(processor) -> tuple[int, int]:
    """(height, width) the processor produces: its crop size if it crops, else its size."""
    size = getattr(processor, "crop_size", None) if getattr(
        processor, "do_center_crop", False) else None
    size = size or processor.size
    if "height" in size:
        return size["height"], size["width"]
    edge = size.get("shortest_edge") or size.get("longest_edge")
    return edge, edge


def augmentation(recipe: Recipe, processor):
    """The recipe's train-only augmentation (torchvision v2), or None when it asks for none."""
    data = recipe.data
    if not (data.augment_crop_scale or data.augment_flip or data.augment_rotation):
        return None
    try:
        from torchvision.transforms import v2
    except ImportError:
        raise PeftlabError("data.augment_*: augmentation needs torchvision; pip install "
                           "'peftlab[vision]'") from None
    steps = []
    if data.augment_crop_scale:
        steps.append(v2.RandomResizedCrop(processor_size(processor),
                                          scale=tuple(data.augment_crop_scale)))
    if data.augment_rotation:
        steps.append(v2.RandomRotation(data.augment_rotation))
    if data.augment_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


@dataclass
class ImageTransform:
    """Picklable (it runs in worker processes): reference -> pixel_values tensor."""
    processor: object
    mode: str  # "RGB" or "L", from the model config's num_channels
    augment: object | None = None

    def __call__(self, ref) -> torch.Tensor:
        image = open_image(ref, self.mode)
        if self.augment is not None:
            image = self.augment(image)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class ImageRows(Dataset):
    """A split's references and labels; items are decoded on access (in the workers).

    An augmented item draws its randomness from a generator seeded by (seed, epoch, index)
    alone, not from a worker's running RNG stream, which depends on which worker got the
    batch and what it decoded before. So a run resumed mid-epoch (whose skipped batches
    shift every later batch to another worker) augments exactly as the unbroken run did, and
    `data.workers` 0, 1 or 8 train the same model (tested)."""

    def __init__(self, rows: dict, transform: ImageTransform, seed: int = 0):
        self.images, self.labels, self.transform = rows["image"], rows["labels"], transform
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # from the sampler, before workers start
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        if self.transform.augment is None:
            pixels = self.transform(self.images[index])
        else:  # torchvision draws from the default CPU generator; it is put back after, so
            # the process's own stream (dropout's, with data.workers 0) is left as it was.
            # (torch.manual_seed would also queue a CUDA seed with a stack trace: 90 us.)
            state = torch.get_rng_state()
            torch.default_generator.manual_seed(hash((self.seed, self.epoch, index)) % 2**62)
            try:
                pixels = self.transform(self.images[index])
            finally:
                torch.set_rng_state(state)
        return {"pixel_values": pixels, "labels": self.labels[index]}


def collate_images(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "labels": torch.tensor([int(item["labels"]) for item in items])}


def image_mode(model_config) -> str:
    return "L" if getattr(model_config, "num_channels", 3) == 1 else "RGB"


def make_image_loader(rows: dict, transform: ImageTransform, batch_size: int, *, train: bool,
                      seed: int, workers: int) -> DataLoader:
    """Train order is seeded per epoch (as text loaders are); evaluation keeps file order.
    Workers are seeded from the loader's own generator, so augmentation is reproducible."""
    dataset = ImageRows(rows, transform, seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = EpochSeededSampler(RandomSampler(dataset, generator=generator), generator,
                                 seed, follower=dataset) if train else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      collate_fn=collate_images, num_workers=workers,
                      persistent_workers=False, drop_last=False,
                      generator=torch.Generator().manual_seed(seed))
