"""MNIST image classification, every strategy side by side, against the same job as a plain HF
Trainer script (benchmarks/hf_trainer_images.py), interleaved in one invocation.

Each round runs every configuration once, in its own process, in a rotated order. Both sides
get the recipe's model config (seeded random weights: no pretrained vision weights offline),
epochs, lr, batch, weight decay, warmup, seed and augmentation, and train and score the same
images: peftlab's seeded stratified split of mnist_test is written out as indices for the
script. Neither evaluates inside the loop or checkpoints. Scores are test accuracy.

Usage: PEFTLAB_DATA=../shared/data python benchmarks/images.py [--rounds 1]
           [--recipe recipes/resnet_mnist_full.yaml]
           [--configs peftlab_full,peftlab_head,...,trainer_full] [--set train.epochs=1 ...]
           [--tag images_mnist_cpu]
Writes benchmarks/results/<tag>.json and <tag>.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.tasks import interleave
from peftlab.config import load_recipe, resolve_data_path
from peftlab.models import resolve_model_path

# peftlab configs: a strategy, or a strategy and a variant ("full-workers0": decoding and
# augmentation in the training process instead of in two DataLoader workers).
CONFIGS = {"full": ["strategy.kind=full"], "head": ["strategy.kind=head"],
           "freeze": ["strategy.kind=freeze", "strategy.freeze_layers=2"],
           "gradual": ["strategy.kind=gradual"],
           "lora": ["strategy.kind=lora", "strategy.lora_r=16", "strategy.lora_alpha=16"],
           "dora": ["strategy.kind=dora", "strategy.lora_r=16", "strategy.lora_alpha=16"],
           "full-workers0": ["strategy.kind=full", "data.workers=0"]}
COMMON = ["train.keep_checkpoints=0", "train.report_to=[none]",
          "train.eval_every_steps=1000000"]  # one evaluation, after training


def run_peftlab(args, kind: str, out: Path) -> dict:
    extra = [*COMMON, *CONFIGS[kind], *args.set]
    strategy = next(o.split("=", 1)[1] for o in CONFIGS[kind] if o.startswith("strategy.kind="))
    out.mkdir(parents=True, exist_ok=True)
    # the planner's peak, blind: before the run, in a process of its own as a user runs it
    subprocess.run([sys.executable, "-m", "peftlab", "plan", args.recipe, *extra,
                    "--strategies", strategy, "--json", str(out.parent / f"{out.name}.plan.json")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    planned = json.loads((out.parent / f"{out.name}.plan.json").read_text())[0]["total"]
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftlab", "train", args.recipe, *extra,
                    "--output-dir", str(out), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((out / "summary.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]
    return {"wall_seconds": round(wall, 2),
            "train_seconds": round(summary["train_seconds"] - summary["eval_seconds"], 2),
            "peak_memory_mb": summary["peak_memory_mb"],
            "predicted_peak_mb": round(planned / 2**20, 1), "steps": summary["steps"],
            "trainable_params": summary["trainable_params"],
            "test": {"accuracy": test["accuracy"]},
            "command": " ".join(["peftlab train", args.recipe, *extra])}


def split_indices(recipe) -> tuple[dict[str, list[int]], Path]:
    """peftlab's train/test images as row numbers of the IDX file (matched by their bytes)."""
    from peftlab.tasks.image_data import _idx_pair, load_image_data, read_idx
    images, _ = _idx_pair(Path(resolve_data_path(recipe.data.train, recipe)))
    rows: dict[bytes, list[int]] = {}
    for number, pixels in enumerate(read_idx(images)):
        rows.setdefault(pixels.tobytes(), []).append(number)
    splits = load_image_data(recipe).splits
    return {split: [rows[pixels.tobytes()].pop(0) for pixels in splits[split]["image"]]
            for split in ("train", "test")}, images


def run_trainer(args, kind: str, out: Path) -> dict:
    recipe = load_recipe(args.recipe, [*COMMON, *args.set])
    out.mkdir(parents=True, exist_ok=True)
    indices, images = split_indices(recipe)
    (out / "split.json").write_text(json.dumps(indices))
    data, train = recipe.data, recipe.train
    command = [sys.executable, str(Path(__file__).parent / "hf_trainer_images.py"),
               "--model", resolve_model_path(recipe.model.name, recipe),
               "--images", str(images),
               "--labels", str(images).replace("images-idx3", "labels-idx1"),
               "--split", str(out / "split.json"), "--epochs", str(train.epochs),
               "--lr", str(train.lr), "--batch", str(train.batch_size),
               "--eval-batch", str(recipe.eval.batch_size),
               "--weight-decay", str(train.weight_decay),
               "--warmup-ratio", str(train.warmup_ratio), "--seed", str(train.seed),
               "--workers", str(data.workers), "--rotation", str(data.augment_rotation),
               "--precision", train.mixed_precision if train.mixed_precision == "bf16" else "no",
               "--out", str(out / "trainer.json")]
    if data.augment_crop_scale:
        command += ["--crop-scale", *map(str, data.augment_crop_scale)]
    tick = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    result = json.loads((out / "trainer.json").read_text())
    return {"wall_seconds": round(wall, 2), "train_seconds": result["train_seconds"],
            "peak_memory_mb": result["peak_memory_mb"], "steps": result["steps"],
            "trainable_params": result["trainable_params"], "test": result["test"],
            "command": " ".join(["python", *command[1:]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/resnet_mnist_full.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--configs", default=",".join(
        [f"peftlab_{kind}" for kind in CONFIGS] + ["trainer_full"]))
    parser.add_argument("--tag", default="images_mnist_cpu")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    args.task = "images"  # the table's columns (benchmarks/tasks.py SCORES)
    interleave(args, "images.py", run_peftlab, run_trainer, {})

if __name__ == "__main__":
    main()
