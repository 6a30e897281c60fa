"""Named-entity recognition (token classification): tagged sentences in, entities out.

Each word's tag sits on its first sub-token and the rest are ignored (-100), as in
transformers' run_ner.py; `data.label_all_subtokens` labels every sub-token instead (B-X
continues as I-X). Evaluation scores whole words against the full gold sentence: a word cut
off by model.max_length counts as predicted O, so truncation shows in the recall instead of
vanishing. Entity precision/recall/F1 follow seqeval (a partial span is wrong).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from peftlab.artifacts import load_artifact, save_artifact
from peftlab.batches import IGNORE, make_loader
from peftlab.config import Recipe
from peftlab.data import format_unknown_tokens, unknown_token_rate
from peftlab.errors import PeftlabError
from peftlab.hardware import precision_context
from peftlab.models import load_pretrained, load_tokenizer, resolve_model_path
from peftlab.strategies import PEFT_KINDS, apply_strategy
from peftlab.task import Task
from peftlab.tasks.ner_data import format_report, load_eval_file, load_tagged_data
from peftlab.tasks.ner_metrics import entity_metrics, words_to_entities
from peftlab.token_cache import tokenized

METRICS = ("f1", "precision", "recall", "accuracy", "loss")  # train.metric_for_best
NEW_HEAD = True
PIPELINE_TAG = "token-classification"  # the hub's pipeline and model-index task type
AUTO_CLASS = "AutoModelForTokenClassification"  # what plain transformers loads it with
CARD_METRICS = ("f1", "precision", "recall", "accuracy")  # metrics.json keys that go in the card's model-index
PREDICT_OPTIONS = ()  # --text and --file, declared by classification


def _continuation(tag_names: list[str]) -> list[int]:
    """The tag a word's later sub-tokens get under label_all_subtokens: B-X -> I-X."""
    index = {name: i for i, name in enumerate(tag_names)}
    return [index.get("I-" + name[2:], i) if name.startswith("B-") else i
            for i, name in enumerate(tag_names)]


def encode_splits(splits, tokenizer, max_length: int, tag_names: list[str],
                  all_subtokens: bool):
    """input_ids, labels (per token), word_starts (1 on each kept word's first sub-token)
    and word_tags (the whole sentence's gold tags, also of words truncation cut off)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PeftlabError(f"{tokenizer.name_or_path}: token classification needs a fast "
                           f"tokenizer (tokenizer.json), for word ids and offsets")
    later = _continuation(tag_names)

    def encode(batch):
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True,
                            max_length=max_length)
        labels, starts = [], []
        for row, tags in enumerate(batch["tags"]):
            row_labels, row_starts, previous = [], [], None
            for word in encoded.word_ids(row):
                first = word is not None and word != previous
                row_starts.append(int(first))
                row_labels.append(IGNORE if word is None else tags[word] if first else
                                  later[tags[word]] if all_subtokens else IGNORE)
                previous = word
            labels.append(row_labels)
            starts.append(row_starts)
        return {**encoded, "labels": labels, "word_starts": starts, "word_tags": batch["tags"]}

    def tokenize(split):
        return split.map(encode, batched=True, remove_columns=["tokens", "tags"],
                         desc="tokenize")

    variant = f"token_classification:{all_subtokens}:{','.join(tag_names)}"
    return {name: tokenized(split, tokenizer, max_length, tokenize, variant)
            for name, split in splits.items()}


def collate_tagged(tokenizer):
    """Pad ids with the tokenizer, labels with -100, word_starts with 0, and word_tags (per
    word, not per token) with -100 to the batch's longest sentence."""
    def collate(rows: list[dict]) -> dict:
        inputs = [{k: v for k, v in row.items() if k not in ("labels", "word_starts",
                                                             "word_tags")} for row in rows]
        batch = tokenizer.pad(inputs, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        words = max(len(row["word_tags"]) for row in rows)
        batch["labels"] = torch.tensor([row["labels"] + [IGNORE] * (width - len(row["labels"]))
                                        for row in rows])
        batch["word_starts"] = torch.tensor([row["word_starts"] + [0] * (
            width - len(row["word_starts"])) for row in rows])
        batch["word_tags"] = torch.tensor([row["word_tags"] + [IGNORE] * (
            words - len(row["word_tags"])) for row in rows])
        return batch
    return collate


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "word_starts", "word_tags")}


def summed_token_cross_entropy(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(**_model_inputs(batch)).logits
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                       ignore_index=IGNORE, reduction="sum")


def count_labelled_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"] != IGNORE).sum()


def word_predictions(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Predicted tag id per gold word (batch x words): the first sub-token's argmax, O for
    words truncation cut off, -100 past the sentence's end."""
    gold = batch["word_tags"]
    out = torch.where(gold == IGNORE, IGNORE, 0)  # tag 0 is O
    predicted = logits.argmax(-1)
    for row in range(gold.shape[0]):
        kept = predicted[row][batch["word_starts"][row].bool()]
        out[row, :kept.numel()] = kept
    return out


@torch.inference_mode()
def evaluate_tagged(model, loader, accelerator, tag_names: list[str]) -> dict:
    """Entity P/R/F1 (micro and per type), word accuracy, and the token loss of a split."""
    model.eval()
    predicted, gold, loss, tokens = [], [], 0.0, 0
    for batch in loader:
        logits = model(**_model_inputs(batch)).logits.float()
        words = word_predictions(logits, batch)
        pair = accelerator.pad_across_processes(torch.stack([words, batch["word_tags"]]),
                                                dim=2, pad_index=IGNORE)
        # per sentence, so gather_for_metrics can drop the duplicates that even out ranks
        summed = nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"],
                                             ignore_index=IGNORE, reduction="none").sum(1)
        counted = (batch["labels"] != IGNORE).sum(1)
        pair, summed, counted = accelerator.gather_for_metrics(
            (pair.transpose(0, 1), summed, counted))
        for words_row, gold_row in zip(pair[:, 0].tolist(), pair[:, 1].tolist()):
            keep = [i for i, tag in enumerate(gold_row) if tag != IGNORE]
            predicted.append([tag_names[words_row[i]] for i in keep])
            gold.append([tag_names[gold_row[i]] for i in keep])
        loss, tokens = loss + float(summed.sum()), tokens + int(counted.sum())
    result = entity_metrics(gold, predicted)
    result["loss"] = loss / max(tokens, 1)
    result["sentences"] = len(gold)
    return result


def load_token_classifier(path: str, recipe: Recipe, tag_names: list[str]) -> nn.Module:
    from transformers import AutoModelForTokenClassification
    return load_pretrained(AutoModelForTokenClassification, path, recipe,
                           num_labels=len(tag_names), id2label=dict(enumerate(tag_names)),
                           label2id={name: i for i, name in enumerate(tag_names)})


def prepare(recipe: Recipe, say) -> Task:
    data = load_tagged_data(recipe)
    say(format_report(data))
    path = resolve_model_path(recipe.model.name, recipe)
    tokenizer = load_tokenizer(path, recipe)
    model = load_token_classifier(path, recipe, data.tag_names)
    report = apply_strategy(model, recipe)
    say(f"strategy {recipe.strategy.kind}: {report.describe()}")
    encoded = encode_splits(data.splits, tokenizer, recipe.model.max_length, data.tag_names,
                            recipe.data.label_all_subtokens)
    if unknown := format_unknown_tokens(unknown_token_rate(encoded["train"], tokenizer),
                                        recipe.model.name):
        say(unknown)
    truncated = sum(sum(row["word_starts"]) < len(row["word_tags"]) for row in encoded["train"])
    if truncated:
        say(f"train: {truncated} sentences longer than model.max_length="
            f"{recipe.model.max_length} tokens are cut (their last words are not learned)")
    collate = collate_tagged(tokenizer)
    loaders = {split: make_loader(
        ds, recipe.train.batch_size if split == "train" else recipe.eval.batch_size,
        collate=collate, train=split == "train", seed=recipe.train.seed,
        group_by_length=recipe.train.group_by_length) for split, ds in encoded.items()}

    def save(unwrapped: nn.Module, run_dir: Path, precision: str) -> None:
        save_artifact(unwrapped, tokenizer, run_dir, recipe.strategy.kind in PEFT_KINDS,
                      {"task": "token_classification", "tag_names": data.tag_names,
                       "base_model": path, "precision": precision})

    return Task(report=report, loaders=loaders, batch_loss=summed_token_cross_entropy,
                count_items=count_labelled_tokens,
                evaluate=lambda m, loader, acc, final=False: evaluate_tagged(
                    m, loader, acc, data.tag_names),
                save=save, default_metric="f1", history_keys=("f1", "precision", "recall",
                                                              "accuracy", "loss"),
                summary={"tags": data.tag_names})


def load(folder: Path, recipe: Recipe, info: dict, dequantize: bool):
    return load_artifact(folder, recipe, info, dequantize,
                         lambda path: load_token_classifier(path, recipe, info["tag_names"]))


def eval_loaders(recipe: Recipe, tokenizer, info: dict, data_file: str | None):
    names = info["tag_names"]
    if data_file:
        splits = load_eval_file(data_file, recipe, names)
    else:
        data = load_tagged_data(recipe)
        unknown = sorted(set(data.tag_names) - set(names))
        if unknown:
            raise PeftlabError(f"the recipe's data now has tags the run never learned "
                               f"({', '.join(unknown)})")
        splits = {s: d for s, d in data.splits.items() if s != "train"}
        remap = [names.index(tag) for tag in data.tag_names]
        splits = {s: d.map(lambda row: {"tags": [remap[t] for t in row["tags"]]})
                  for s, d in splits.items()}
    encoded = encode_splits(splits, tokenizer, recipe.model.max_length, names,
                            recipe.data.label_all_subtokens)
    loaders = {split: make_loader(ds, recipe.eval.batch_size, collate=collate_tagged(tokenizer),
                                  train=False, seed=0) for split, ds in encoded.items()}
    return loaders, lambda model, loader, acc: evaluate_tagged(model, loader, acc, names)


@torch.inference_mode()
def tag_texts(model, tokenizer, texts: list[str], max_length: int, tag_names: list[str],
              precision: str = "no", batch_size: int = 32) -> list[list[dict]]:
    """Entities per raw text: words are the tokenizer's own pre-tokenization; each word takes
    its first sub-token's tag and probability (the HF pipeline's "first" aggregation)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        encoded = tokenizer(chunk, truncation=True, max_length=max_length, padding=True,
                            return_offsets_mapping=True, return_tensors="pt")
        offsets = encoded.pop("offset_mapping")
        with precision_context(precision, device):
            logits = model(**encoded.to(device)).logits
        probs = logits.float().softmax(-1).cpu()
        for row, text in enumerate(chunk):
            words: dict[int, list] = {}
            for position, word in enumerate(encoded.word_ids(row)):
                if word is None:
                    continue
                begin, end = offsets[row, position].tolist()
                if word not in words:
                    best = probs[row, position].max(-1)
                    words[word] = [tag_names[int(best.indices)], float(best.values), begin, end]
                words[word][3] = end
            out.append(words_to_entities(text, list(words.values())))
    return out


def predict(args, run_dir: Path, info: dict) -> None:
    """--text: one JSON line per text with its entities; --file: the rows with an `entities`
    column (a JSON list in CSV, a list in JSON/JSONL)."""
    from peftlab.artifacts import load_trained
    if not args.text and not args.file:
        raise PeftlabError("predict: an NER run; give --text \"...\" (repeatable) or --file "
                           "in.csv --output out.jsonl")
    model, tokenizer, recipe, info = load_trained(run_dir)
    names, length = info["tag_names"], recipe.model.max_length
    for text, entities in zip(args.text or [], tag_texts(
            model, tokenizer, args.text or [], length, names, info["precision"])):
        print(json.dumps({"text": text, "entities": entities}, ensure_ascii=False))
    if args.file:
        from peftlab.sources import read_source
        table = read_source(args.file, "auto", recipe.data.text_column, "").to_pandas()
        column = recipe.data.text_column
        if column not in table.columns:
            raise PeftlabError(f"{args.file}: no column '{column}' (columns: "
                               f"{', '.join(map(str, table.columns))}); set data.text_column")
        texts = table[column].fillna("").astype(str).tolist()
        entities = tag_texts(model, tokenizer, texts, length, names, info["precision"])
        if Path(args.output).suffix.lower() in (".json", ".jsonl"):
            table["entities"] = entities
            table.to_json(args.output, orient="records", lines=True, force_ascii=False)
        else:
            table["entities"] = [json.dumps(found, ensure_ascii=False) for found in entities]
            table.to_csv(args.output, index=False)
        print(f"wrote {len(table)} rows with entities to {args.output}")


def meta_model(config, recipe: Recipe) -> nn.Module:
    from transformers import AutoModelForTokenClassification
    config.num_labels = max(len(recipe.data.label_names or []), 9)  # CoNLL-2003's 9 tags
    with torch.device("meta"):
        return AutoModelForTokenClassification.from_config(config)


def plan_census(config, recipe: Recipe) -> None:
    return None  # the planner's closed-form transformer terms size it (memory.py)


def output_bytes(recipe: Recipe, tokens: int, vocab: int, training: bool) -> float:
    return 0.0  # tokens x tags logits: a few numbers per token beside the activations



def frozen_cache_bytes(recipe: Recipe, kind: str, hidden: int, precision: str) -> float:
    return 0.0  # no frozen-feature cache for this task (train.cache_frozen: true is refused)


def serve_routes(app, served, auth) -> None:
    from peftlab.tasks.token_classification_serve import add_routes
    add_routes(app, served, auth)
