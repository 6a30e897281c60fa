"""The image job as a plain HF `Trainer` script, in the style of transformers'
run_image_classification.py.

It knows nothing of peftlab: it reads the IDX files itself, takes the train and test image
indices from a JSON file (the split benchmarks/images.py got from peftlab, so both sides
train and score the same images), applies the model's AutoImageProcessor with the same
torchvision v2 augmentation on train, trains AutoModelForImageClassification built from its
config (seeded random weights: nothing pretrained is reachable offline) and scores test.

Usage: python benchmarks/hf_trainer_images.py --model CONFIG_DIR --images IDX --labels IDX
           --split split.json --epochs 4 --lr 2e-3 --batch 64 [--rotation 10]
           [--crop-scale 0.85 1.0] --out out.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import struct
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
)


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw, np.uint8, count * rows * cols, 16).reshape(count, rows, cols)
    return np.frombuffer(raw, np.uint8, count, 8)


class Digits(Dataset):
    def __init__(self, pixels, labels, processor, augment=None):
        self.pixels, self.labels = pixels, labels
        self.processor, self.augment = processor, augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = Image.fromarray(self.pixels[index]).convert("L")
        if self.augment is not None:
            image = self.augment(image)
        values = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": values, "labels": int(self.labels[index])}


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--images", "--labels", "--split", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rotation", type=float, default=0)
    parser.add_argument("--crop-scale", type=float, nargs=2)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()

    pixels, labels = read_idx(args.images), read_idx(args.labels)
    split = json.loads(Path(args.split).read_text())
    processor = AutoImageProcessor.from_pretrained(args.model)
    steps = []
    if args.crop_scale:
        steps.append(v2.RandomResizedCrop((28, 28), scale=tuple(args.crop_scale)))
    if args.rotation:
        steps.append(v2.RandomRotation(args.rotation))
    augment = v2.Compose(steps) if steps else None
    train = Digits(pixels[split["train"]], labels[split["train"]], processor, augment)
    test = Digits(pixels[split["test"]], labels[split["test"]], processor)

    config = AutoConfig.from_pretrained(args.model, num_labels=10)
    torch.manual_seed(args.seed)
    model = AutoModelForImageClassification.from_config(config)
    training = TrainingArguments(
        output_dir=args.out + ".trainer", num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.eval_batch,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # below 1: a ratio of the steps, in transformers 5
        lr_scheduler_type="linear", seed=args.seed, bf16=args.precision == "bf16",
        dataloader_num_workers=args.workers, save_strategy="no", eval_strategy="no",
        report_to=[], logging_steps=50, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=training, train_dataset=train)
    tick = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - tick
    predictions = trainer.predict(test)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"train_seconds": round(train_seconds, 2), "steps": result.global_step,
           "peak_memory_mb": round(peak, 1),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "test": {"accuracy": accuracy}}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
