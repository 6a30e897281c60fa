"""Text classification: labelled data, a classifier head, accuracy/F1 metrics, predicted
labels with their probability.

The run folder holds `adapter/` (peft kinds; loadable by plain `PeftModel.from_pretrained`,
head included through modules_to_save) or `model/` (full safetensors), each with the
tokenizer. A mean-pooled head adds `classifier.safetensors` beside the body, since
transformers has no such head class.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DataCollatorWithPadding

from peftlab.artifacts import attach_adapter, base_path, write_info
from peftlab.batches import IGNORE, make_loader
from peftlab.config import Recipe
from peftlab.data import format_unknown_tokens, tokenize_splits, unknown_token_rate
from peftlab.errors import PeftlabError
from peftlab.frozen_cache import (
    Boundary,
    cache_bytes,
    cache_loaders,
    cache_pays,
    find_boundary,
    fits_in_memory,
    forward_logits,
    refuse,
)
from peftlab.hardware import precision_context
from peftlab.models import load_tokenizer, resolve_model_path
from peftlab.quantization import FROZEN_BASE_KINDS, dequantize_linears
from peftlab.strategies import PEFT_KINDS, apply_strategy
from peftlab.task import Task
from peftlab.tasks.classification_data import (
    format_report,
    load_eval_file,
    load_labelled_data,
)
from peftlab.tasks.classification_metrics import evaluate_split
from peftlab.tasks.classification_model import (
    build_classifier,
    load_classifier,
    trained_for_mean_pooling,
)

HEAD_FILE = "classifier.safetensors"
METRICS = ("f1_macro", "accuracy", "f1_weighted", "precision_macro", "recall_macro",
           "precision_weighted", "recall_weighted", "loss")  # train.metric_for_best
NEW_HEAD = True
PIPELINE_TAG = "text-classification"  # the hub's pipeline and model-index task type
AUTO_CLASS = "AutoModelForSequenceClassification"  # what plain transformers loads it with
CARD_METRICS = ("accuracy", "f1_macro")  # metrics.json keys that go in the card's model-index
PREDICT_OPTIONS = (
    (("--text",), {"action": "append", "help": "a text to label (classification, NER; "
                                               "repeatable)"}),
)


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


def prepare(recipe: Recipe, say) -> Task:
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



def save_trained(model, tokenizer, run_dir: Path, *, pooling: str, peft: bool,
                 label_names: list[str], base_path: str, precision: str) -> Path:
    """Write the trained weights (adapter or full model) and tokenizer; returns the folder."""
    folder = run_dir / ("adapter" if peft else "model")
    body = model.backbone if pooling == "mean" else model
    body.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if pooling == "mean":
        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in model.classifier.state_dict().items()}
        save_file(state, folder / HEAD_FILE)
    write_info(run_dir, {"artifact": folder.name, "task": "classification", "pooling": pooling,
                         "label_names": label_names, "base_model": base_path,
                         "precision": precision})
    return folder


def load(folder: Path, recipe: Recipe, info: dict, dequantize: bool):
    """The classifier as trained: base + adapter (the head inside it, or beside it for mean
    pooling), or the full model."""
    names, pooling = info["label_names"], info["pooling"]
    tokenizer = load_tokenizer(str(folder), recipe)
    if info["artifact"] == "adapter":
        model = build_classifier(base_path(recipe, info), pooling, names, recipe,
                                 tokenizer.pad_token_id)
        if dequantize:
            dequantize_linears(model)
        if pooling == "mean":
            model.backbone = attach_adapter(model.backbone, folder, recipe)
        else:
            model = attach_adapter(model, folder, recipe)
    else:
        model = build_classifier(str(folder), pooling, names, recipe, tokenizer.pad_token_id)
    if pooling == "mean":
        model.classifier.load_state_dict(load_file(folder / HEAD_FILE))
    return model.eval(), tokenizer


def predict_texts(model, tokenizer, texts: list[str], max_length: int, precision: str = "no",
                  batch_size: int = 64) -> list[tuple[int, float]]:
    """(label id, probability) per text, in input order, in the run's precision."""
    return [max(enumerate(row), key=lambda pair: pair[1]) for row in class_probabilities(
        model, tokenizer, texts, max_length, precision, batch_size)]


@torch.inference_mode()
def class_probabilities(model, tokenizer, texts: list[str], max_length: int,
                        precision: str = "no", batch_size: int = 64) -> list[list[float]]:
    """Every label's probability per text, in input order. Texts are tokenized once and go
    longest first, so each batch pads to nearly its own length (as evaluation does)."""
    device = next(model.parameters()).device
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: (-len(encoded["input_ids"][i]), i))
    out: list[list[float]] = [[] for _ in texts]
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = tokenizer.pad([{k: v[i] for k, v in encoded.items()} for i in chosen],
                              return_tensors="pt").to(device)
        with precision_context(precision, device):
            logits = model(**batch).logits
        for i, row in zip(chosen, logits.float().softmax(-1).tolist()):
            out[i] = row
    return out


def serve_routes(app, served, auth) -> None:
    from peftlab.tasks.classification_serve import add_routes
    add_routes(app, served, auth)


def eval_loaders(recipe: Recipe, tokenizer, info: dict, data_file: str | None):
    names = info["label_names"]
    if data_file:
        splits = load_eval_file(data_file, recipe, names)
    else:
        data = load_labelled_data(recipe)
        if data.label_names != names:
            raise PeftlabError(f"the recipe's data now has labels {data.label_names}, the "
                               f"run was trained on {names}")
        splits = data.splits
    tokenized = tokenize_splits(splits, tokenizer, recipe.model.max_length)
    collate = DataCollatorWithPadding(tokenizer)
    loaders = {split: make_loader(tokenized[split], recipe.eval.batch_size, collate=collate,
                                  train=False, seed=0) for split in tokenized if split != "train"}
    return loaders, lambda model, loader, acc: evaluate_split(model, loader, acc, names)


def predict(args, run_dir: Path, info: dict) -> None:
    """--text: one line per text (label, probability, text); --file: its rows with
    predicted_label and probability columns, written to --output."""
    from peftlab.artifacts import load_trained
    if not args.text and not args.file:
        raise PeftlabError("predict: a classification run; give --text \"...\" (repeatable) "
                           "or --file in.csv")
    model, tokenizer, recipe, info = load_trained(run_dir)
    names = info["label_names"]
    if args.text:
        for text, (label, prob) in zip(args.text, predict_texts(
                model, tokenizer, args.text, recipe.model.max_length, info["precision"])):
            print(f"{names[label]}\t{prob:.4f}\t{text}")
    if args.file:
        from peftlab.sources import read_source
        table = read_source(args.file, "auto", recipe.data.text_column,
                            recipe.data.label_column).to_pandas()
        column = recipe.data.text_column
        if column not in table.columns:
            raise PeftlabError(f"{args.file}: no column '{column}' (columns: "
                               f"{', '.join(map(str, table.columns))})")
        texts = table[column].fillna("").astype(str).tolist()
        predictions = predict_texts(model, tokenizer, texts, recipe.model.max_length,
                                    info["precision"])
        table["predicted_label"] = [names[label] for label, _ in predictions]
        table["probability"] = [round(prob, 6) for _, prob in predictions]
        table.to_csv(args.output, index=False)
        print(f"wrote {len(table)} predictions to {args.output}")


def meta_model(config, recipe: Recipe) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    config.num_labels = max(len(recipe.data.label_names or []), 2)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def plan_census(config, recipe: Recipe) -> None:
    return None  # the planner's closed-form transformer terms size it (memory.py)


def output_bytes(recipe: Recipe, tokens: int, vocab: int, training: bool) -> float:
    return 0.0  # a few logits per example: nothing beside the activations


def frozen_cache_bytes(recipe: Recipe, kind: str, hidden: int, precision: str) -> float:
    """Planner: what train.cache_frozen would keep in memory under strategy `kind`, from the
    data's real token lengths (tokenized through the token cache, so the run that follows
    loads them back) and the same formula cache_loaders uses. 0 when it would not cache, or
    would memory-map the features (file pages the system can drop)."""
    setting, s = recipe.train.cache_frozen, recipe.strategy
    if setting is False or kind not in ("head", "freeze") or \
            (kind == "freeze" and s.freeze_layers < 1):
        return 0.0
    path = resolve_model_path(recipe.model.name, recipe)
    pooled = kind == "head" and (recipe.model.pooling == "mean" or recipe.model.pooling ==
                                 "auto" and trained_for_mean_pooling(path))
    tokenized = tokenize_splits(load_labelled_data(recipe).splits,
                                load_tokenizer(path, recipe), recipe.model.max_length)
    lengths = {split: [len(ids) for ids in rows["input_ids"]] for split, rows in
               tokenized.items()}
    train_batches = math.ceil(len(lengths["train"]) / recipe.train.batch_size)
    if setting == "auto" and not cache_pays(recipe, train_batches):
        return 0.0
    bf16_base = precision == "bf16" and kind in FROZEN_BASE_KINDS  # stored in bf16
    needed = cache_bytes(lengths, hidden, Boundary("pooled" if pooled else "layer"),
                         4 if precision == "no" else 2, 2 if bf16_base else 4)
    return float(needed) if fits_in_memory(needed) else 0.0
