"""Is the training loop image-bound? peftlab's image loader alone (decode, augment, the model's
processor, collate) at 0, 1 and 2 DataLoader workers, against the training step it feeds.

JPEG photos are what users bring, so the MNIST digits are written out as 256 x 256 RGB JPEGs
(once, under runs/bench/), and the loader decodes them with ViT-base's processor (224 x 224)
and the recipe augmentations (random resized crop, flip, rotation). Each setting reads the
same images, interleaved over --rounds. The step it is compared with is a training step of
the small ViT recipe on the same batch (fp32, this CPU), measured in this process.

Usage: PEFTLAB_DATA=../shared/data python benchmarks/image_loader.py [--images 512]
           [--batch 32] [--rounds 3] [--tag image_loader_cpu]
Writes benchmarks/results/<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine
from benchmarks.tasks import RESULTS


def write_jpegs(count: int, folder: Path) -> list[str]:
    from PIL import Image

    from peftlab.tasks.image_data import _idx_pair, read_idx
    folder.mkdir(parents=True, exist_ok=True)
    pixels = read_idx(_idx_pair(Path(os.environ["PEFTLAB_DATA"]) / "mnist_test")[0])
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        if not path.exists():
            Image.fromarray(pixels[index]).convert("RGB").resize((256, 256)).save(path,
                                                                                  quality=90)
        paths.append(str(path))
    return paths


def vit_base_processor():
    from transformers import ViTImageProcessor
    return ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)  # google/vit-base-patch16-224's settings


def loader_seconds(paths: list[str], batch: int, workers: int) -> float:
    from peftlab.config import recipe_from_dict
    from peftlab.tasks.image_loading import ImageTransform, augmentation, make_image_loader
    recipe = recipe_from_dict({"model": {"name": "x", "task": "image_classification"},
                               "data": {"train": "x", "augment_crop_scale": [0.8, 1.0],
                                        "augment_flip": True, "augment_rotation": 10}})
    processor = vit_base_processor()
    transform = ImageTransform(processor, "RGB", augmentation(recipe, processor))
    loader = make_image_loader({"image": paths, "labels": [0] * len(paths)}, transform,
                               batch, train=True, seed=0, workers=workers)
    tick = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - tick


def step_seconds(batch: int, steps: int = 5) -> float:
    """A fp32 training step of ViT-base's width at depth 2 instead of 12 (about a sixth of
    ViT-base's step): if the loader keeps up with this, it keeps up with any real model."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_hidden_layers=2, num_labels=10)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):
        tick = time.perf_counter()
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - tick)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tag", default="image_loader_cpu")
    args = parser.parse_args()
    paths = write_jpegs(args.images, Path("runs/bench/image_loader_jpegs"))
    loader_seconds(paths[: args.batch * 2], args.batch, 0)  # warm the page cache
    settings = (0, 1, 2)
    seconds: dict[int, list[float]] = {w: [] for w in settings}
    for round_index in range(args.rounds):
        for workers in settings[round_index % 3:] + settings[: round_index % 3]:
            seconds[workers].append(loader_seconds(paths, args.batch, workers))
            print(f"workers {workers}: {args.images / seconds[workers][-1]:.0f} images/s",
                  flush=True)
    step = step_seconds(args.batch)
    record = {"images": args.images, "batch": args.batch, "image_size": "256x256 JPEG -> 224",
              "loader_images_per_second": {
                  str(w): {"median": round(args.images / statistics.median(s), 1),
                           "min": round(args.images / max(s), 1),
                           "max": round(args.images / min(s), 1)} for w, s in seconds.items()},
              "vit_base_depth2_step_seconds": round(step, 3),
              "vit_base_depth2_images_per_second": round(args.batch / step, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"command": " ".join(["python benchmarks/image_loader.py", *sys.argv[1:]]),
         "machine": machine(), **record}, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
