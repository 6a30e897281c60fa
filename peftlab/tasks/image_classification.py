"""Image classification: image folders, tables of paths, `datasets` Image columns and IDX
files; any `AutoModelForImageClassification` (ViT, ResNet, ConvNeXt, Swin) with a new head
for the user's labels; accuracy/F1 metrics; predicted labels with their probability.

The run folder holds `adapter/` (peft kinds; plain `PeftModel.from_pretrained` loads it, head
included through modules_to_save) or `model/` (full safetensors), each with the image
processor. A model trained from scratch (`model.from_config`) also keeps its initial weights
in `base/`, since no hub or folder holds the base its adapter was trained on.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from peftlab.artifacts import attach_adapter, base_path, write_info
from peftlab.batches import IGNORE
from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.hardware import precision_context
from peftlab.models import hub_kwargs, load_error, load_pretrained, resolve_model_path
from peftlab.quantization import dequantize_linears
from peftlab.strategies import PEFT_KINDS, apply_strategy
from peftlab.task import Task
from peftlab.tasks.classification_metrics import evaluate_split
from peftlab.tasks.classification_model import label_kwargs
from peftlab.tasks.image_data import format_image_report, load_image_data, read_images
from peftlab.tasks.image_loading import (
    ImageTransform,
    augmentation,
    image_mode,
    make_image_loader,
)

METRICS = ("f1_macro", "accuracy", "f1_weighted", "precision_macro", "recall_macro",
           "precision_weighted", "recall_weighted", "loss")  # train.metric_for_best
NEW_HEAD = True
PIPELINE_TAG = "image-classification"
AUTO_CLASS = "AutoModelForImageClassification"
INPUTS_CLASS = "AutoImageProcessor"  # model card: what prepares its inputs
CARD_METRICS = ("accuracy", "f1_macro")
PREDICT_OPTIONS = (
    (("--image",), {"action": "append", "help": "image classification runs: an image file "
                                                "(repeatable)"}),
)


def load_processor(path: str, recipe: Recipe):
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(path, **hub_kwargs(recipe))
    except (OSError, ValueError) as err:
        raise PeftlabError(f"{recipe.model.name}: no image processor "
                           f"(preprocessor_config.json) to resize and normalise images "
                           f"({str(err).splitlines()[0][:160]})") from None


def build_image_model(path: str, label_names: list[str], recipe: Recipe,
                      from_config: bool) -> nn.Module:
    """The model in `path` with a head for our labels: pretrained weights (a new head where
    the class count differs), or random weights from its config (training from scratch)."""
    from transformers import AutoConfig, AutoModelForImageClassification
    if not from_config:
        return load_pretrained(AutoModelForImageClassification, path, recipe,
                               ignore_mismatched_sizes=True, **label_kwargs(label_names))
    try:
        config = AutoConfig.from_pretrained(path, **label_kwargs(label_names),
                                            **hub_kwargs(recipe))
    except (OSError, ValueError) as err:
        raise load_error(recipe.model.name, err) from None
    torch.manual_seed(recipe.train.seed)  # the same initial weights for the same recipe
    return AutoModelForImageClassification.from_config(config)


def _check_quantizable(model: nn.Module, recipe: Recipe) -> None:
    """bitsandbytes quantizes linear layers only: a convolutional body would train a LoRA
    over full-precision convolutions while the recipe promises a 4-bit base."""
    from peftlab.quantization import quantization_kind
    if quantization_kind(recipe) != "none" and not any(
            type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        raise PeftlabError(f"{recipe.model.name}: {type(model).__name__} has no linear layers "
                           f"to quantize ({recipe.strategy.kind}, model.quantization "
                           f"{recipe.model.quantization}); use strategy.kind lora or dora")


def count_examples(batch: dict) -> torch.Tensor:
    return (batch["labels"] != IGNORE).sum()


def summed_cross_entropy(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(pixel_values=batch["pixel_values"]).logits
    return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum",
                                       ignore_index=IGNORE)


def _loaders(splits: dict, processor, mode: str, recipe: Recipe, train_split: bool) -> dict:
    plain = ImageTransform(processor, mode)
    augmented = ImageTransform(processor, mode, augmentation(recipe, processor))
    return {split: make_image_loader(
        rows, augmented if split == "train" else plain,
        recipe.train.batch_size if split == "train" else recipe.eval.batch_size,
        train=split == "train", seed=recipe.train.seed, workers=recipe.data.workers)
        for split, rows in splits.items() if train_split or split != "train"}


def prepare(recipe: Recipe, say) -> Task:
    """Read and check the images, build the model with its new head, apply the strategy."""
    if recipe.train.cache_frozen is True:
        raise PeftlabError("train.cache_frozen: true is not available for image "
                           "classification (augmented inputs change every epoch)")
    data = load_image_data(recipe)
    say(format_image_report(data))
    path = resolve_model_path(recipe.model.name, recipe)
    processor = load_processor(path, recipe)
    model = build_image_model(path, data.label_names, recipe, recipe.model.from_config)
    initial = copy.deepcopy(model).cpu() if recipe.model.from_config and \
        recipe.strategy.kind in PEFT_KINDS else None  # the base an adapter goes on
    _check_quantizable(model, recipe)
    report = apply_strategy(model, recipe)
    say(f"strategy {recipe.strategy.kind}: {report.describe()}")
    mode = image_mode(model.config)  # RGB or L: kept in peftlab.json for eval and predict
    loaders = _loaders(data.splits, processor, mode, recipe, True)

    def evaluate(model, loader, accelerator, final=False):
        hub = recipe.eval.hub_metrics if final else []
        return evaluate_split(model, loader, accelerator, data.label_names, hub)

    def save(unwrapped: nn.Module, run_dir: Path, precision: str) -> None:
        peft = recipe.strategy.kind in PEFT_KINDS
        folder = run_dir / ("adapter" if peft else "model")
        unwrapped.save_pretrained(folder)
        processor.save_pretrained(folder)
        base = path
        if initial is not None:
            initial.save_pretrained(run_dir / "base")
            base = "base"  # inside the run folder
        write_info(run_dir, {"artifact": folder.name, "task": "image_classification",
                             "label_names": data.label_names, "base_model": base,
                             "image_mode": mode, "precision": precision})

    return Task(report=report, loaders=loaders, batch_loss=summed_cross_entropy,
                count_items=count_examples, evaluate=evaluate, save=save,
                default_metric="f1_macro", history_keys=("accuracy", "f1_macro", "loss"),
                summary={"labels": data.label_names})


def load(folder: Path, recipe: Recipe, info: dict, dequantize: bool):
    """(model in eval mode, image processor) of a finished run."""
    processor = load_processor(str(folder), recipe)
    names = info["label_names"]
    if info["artifact"] == "adapter":
        base = str(folder.parent / "base") if info["base_model"] == "base" else \
            base_path(recipe, info)
        model = build_image_model(base, names, recipe, from_config=False)
        if dequantize:
            dequantize_linears(model)
        model = attach_adapter(model, folder, recipe)
    else:
        model = build_image_model(str(folder), names, recipe, from_config=False)
    return model.eval(), processor


@torch.inference_mode()
def image_probabilities(model, processor, images: list, precision: str = "no",
                        batch_size: int = 32) -> list[list[float]]:
    """Every label's probability per image (a path, bytes or PIL-readable reference)."""
    device = next(model.parameters()).device
    transform = ImageTransform(processor, image_mode(model.config))
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(ref) for ref in images[start:start + batch_size]])
        with precision_context(precision, device):
            logits = model(pixel_values=pixels.to(device)).logits
        out += logits.float().softmax(-1).tolist()
    return out


def predict_images(model, processor, images: list, precision: str = "no"):
    """(label id, probability) per image, in input order."""
    return [max(enumerate(row), key=lambda pair: pair[1])
            for row in image_probabilities(model, processor, images, precision)]


def _checked(paths: list[str]) -> list[str]:
    from peftlab.tasks.image_data import _decodes
    for path in paths:
        if not Path(path).is_file() or not _decodes(path):
            raise PeftlabError(f"predict: {path} is not a readable image")
    return paths


def predict(args, run_dir: Path, info: dict) -> None:
    """--image: one line per image (label, probability, file); --file: a table with the
    recipe's image column, written to --output with predicted_label and probability."""
    from peftlab.artifacts import load_trained
    if not getattr(args, "image", None) and not args.file:
        raise PeftlabError("predict: an image classification run; give --image FILE "
                           "(repeatable) or --file images.csv")
    images = _checked(args.image or [])
    model, processor, recipe, info = load_trained(run_dir)
    names = info["label_names"]
    for path, (label, prob) in zip(images, predict_images(model, processor, images,
                                                           info["precision"])):
        print(f"{names[label]}\t{prob:.4f}\t{path}")
    if args.file:
        import pandas as pd
        rows = read_images(args.file, recipe, f"--file {args.file}", labelled=False)
        refs = _checked(rows["image"])
        predictions = predict_images(model, processor, refs, info["precision"])
        table = pd.DataFrame({recipe.data.image_column: refs,
                              "predicted_label": [names[label] for label, _ in predictions],
                              "probability": [round(prob, 6) for _, prob in predictions]})
        table.to_csv(args.output, index=False)
        print(f"wrote {len(table)} predictions to {args.output}")


def eval_loaders(recipe: Recipe, processor, info: dict, data_file: str | None):
    names = info["label_names"]
    if data_file:
        from peftlab.tasks.classification_data import _labels_index_names, _to_ids
        from peftlab.tasks.image_data import clean_images
        columns, _ = clean_images(read_images(data_file, recipe, data_file), recipe, data_file)
        splits = {"eval": _to_ids(columns, names, _labels_index_names(recipe, columns["label"]),
                                  data_file, recipe)}
    else:
        data = load_image_data(recipe)
        if data.label_names != names:
            raise PeftlabError(f"the recipe's data now has labels {data.label_names}, the "
                               f"run was trained on {names}")
        splits = data.splits
    loaders = _loaders(splits, processor, info["image_mode"], recipe, False)
    return loaders, lambda model, loader, acc: evaluate_split(model, loader, acc, names)


def serve_routes(app, served, auth) -> None:
    from peftlab.tasks.image_serve import add_routes
    add_routes(app, served, auth)


def meta_model(config, recipe: Recipe) -> nn.Module:
    """The classifier on the meta device, its head sized by data.label_names (else 2)."""
    from transformers import AutoModelForImageClassification
    config.num_labels = max(len(recipe.data.label_names or []), 2)
    with torch.device("meta"):
        return AutoModelForImageClassification.from_config(config)


def plan_census(config, recipe: Recipe):
    """Planner: images are sized by a census of the model's saved tensors (patches, feature
    maps), over meta batches at the processor's output size; see census.py."""
    from peftlab.census import CensusSpec
    from peftlab.tasks.image_data import memory_bytes
    from peftlab.tasks.image_loading import processor_size
    height, width = processor_size(load_processor(
        resolve_model_path(recipe.model.name, recipe), recipe))
    channels = getattr(config, "num_channels", 3)

    def batch(size: int) -> dict:
        return {"pixel_values": torch.empty(size, channels, height, width, device="meta"),
                "labels": torch.zeros(size, dtype=torch.long, device="meta")}

    return CensusSpec(batch=batch, loss=summed_cross_entropy,
                      describe=f"{channels}x{height}x{width} images",
                      data_bytes=memory_bytes(recipe))
