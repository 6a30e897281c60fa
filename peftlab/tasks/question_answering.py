"""Extractive question answering (SQuAD-style): the answer is a span of the context.

Contexts longer than model.max_length are cut into windows that overlap by
`data.doc_stride` tokens (the tokenizer's overflow with the offset mapping), as in
transformers' run_qa.py. A training window whose answer is not wholly inside it points at
[CLS] (index 0), as does every window of an unanswerable question. Evaluation scores the
n-best start and end positions of every window of a question (context tokens only, at
most `eval.max_answer_length` tokens), keeps the best span, and, where questions can be
unanswerable, answers "" when the [CLS] score beats it by `eval.null_threshold`.
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
from peftlab.tasks.qa_data import format_report, load_eval_file, load_qa_data
from peftlab.tasks.qa_metrics import best_span, squad_scores
from peftlab.token_cache import tokenized

METRICS = ("f1", "exact_match", "loss")  # train.metric_for_best
NEW_HEAD = True
PIPELINE_TAG = "question-answering"  # the hub's pipeline and model-index task type
AUTO_CLASS = "AutoModelForQuestionAnswering"  # what plain transformers loads it with
CARD_METRICS = ("exact_match", "f1")  # metrics.json keys that go in the card's model-index
PREDICT_OPTIONS = (
    (("--question",), {"action": "append", "help": "QA runs: a question (repeatable, one "
                                                   "--context each)"}),
    (("--context",), {"action": "append", "help": "QA runs: the text to answer from"}),
)
EXTRA = ("labels", "example_index", "offsets")  # feature columns the model does not take
PADDING_LOGIT = -1e9  # exp() of it is 0 in fp32: a padding token is never a start or end


def encode_splits(splits, tokenizer, max_length: int, stride: int, cache: bool = True):
    """Windows of (question, context): ids, labels = [start, end] token of the answer
    ([CLS] = 0 when it is not inside), example_index, and offsets (-1 off the context)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PeftlabError(f"{tokenizer.name_or_path}: question answering needs a fast "
                           f"tokenizer (tokenizer.json), for offsets")
    if stride >= max_length // 2:
        raise PeftlabError(f"data.doc_stride={stride} must be below half of model.max_length="
                           f"{max_length}")
    question_first = tokenizer.padding_side == "right"
    context_id = 1 if question_first else 0

    def encode(batch, indices):
        pair = (batch["question"], batch["context"]) if question_first else \
            (batch["context"], batch["question"])
        encoded = tokenizer(*pair, truncation="only_second" if question_first else
                            "only_first", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        owners = encoded.pop("overflow_to_sample_mapping")
        all_offsets = encoded.pop("offset_mapping")
        labels, examples, kept_offsets = [], [], []
        for window, offsets in enumerate(all_offsets):
            owner, sequence = owners[window], encoded.sequence_ids(window)
            context = [i for i, s in enumerate(sequence) if s == context_id]
            kept_offsets.append([list(o) if sequence[i] == context_id else [-1, -1]
                                 for i, o in enumerate(offsets)])
            examples.append(indices[owner])
            starts, texts = batch["answer_start"][owner], batch["answer_text"][owner]
            labels.append(_answer_tokens(offsets, context, starts[0], starts[0] + len(texts[0]))
                          if starts else [0, 0])
        return {**encoded, "labels": labels, "example_index": examples, "offsets": kept_offsets}

    def tokenize(split):
        return split.map(encode, batched=True, with_indices=True,
                         remove_columns=split.column_names, desc="tokenize")

    if not cache:
        return {name: tokenize(split) for name, split in splits.items()}
    return {name: tokenized(split, tokenizer, max_length, tokenize,
                            f"question_answering:{stride}") for name, split in splits.items()}


def _answer_tokens(offsets, context: list[int], start: int, end: int) -> list[int]:
    """[first, last] token of the answer's characters, or [0, 0] when the window misses it."""
    if not context or offsets[context[0]][0] > start or offsets[context[-1]][1] < end:
        return [0, 0]
    first = next(i for i in context if offsets[i][1] > start)
    last = next(i for i in reversed(context) if offsets[i][0] < end)
    return [first, last]


def collate_windows(tokenizer):
    def collate(rows: list[dict]) -> dict:
        batch = tokenizer.pad([{k: v for k, v in row.items() if k not in EXTRA}
                               for row in rows], return_tensors="pt")
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.tensor([row["labels"] for row in rows])
        batch["example_index"] = torch.tensor([row["example_index"] for row in rows])
        batch["offsets"] = torch.tensor([row["offsets"] + [[-1, -1]] * (width - len(
            row["offsets"])) for row in rows])
        return batch
    return collate


def _logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end logits in fp32, padding positions out of the softmax: the loss of a
    window then does not depend on how far its batch is padded (one process with batch 8
    equals two with batch 4)."""
    out = model(**{k: v for k, v in batch.items() if k not in EXTRA})
    padding = batch["attention_mask"] == 0
    return (out.start_logits.float().masked_fill(padding, PADDING_LOGIT),
            out.end_logits.float().masked_fill(padding, PADDING_LOGIT))


def summed_span_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """(start + end cross-entropy) / 2 summed over windows; padding windows (ignored labels)
    add nothing."""
    start, end = _logits(model, batch)
    labels = batch["labels"]
    return (nn.functional.cross_entropy(start, labels[:, 0], ignore_index=IGNORE,
                                        reduction="sum") +
            nn.functional.cross_entropy(end, labels[:, 1], ignore_index=IGNORE,
                                        reduction="sum")) / 2


def count_windows(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 0] != IGNORE).sum()


def window_answers(start, end, batch, n_best: int, max_answer_length: int) -> torch.Tensor:
    """Per window: example index, best span score, its start/end character, its
    probability (p_start x p_end within the window), and the [CLS] (no answer) score."""
    rows = []
    log_start, log_end = start.log_softmax(-1), end.log_softmax(-1)
    for i in range(start.shape[0]):
        offsets = batch["offsets"][i].tolist()
        found = best_span(start[i].tolist(), end[i].tolist(), offsets, n_best,
                          max_answer_length)
        score, first, last, s, e = found or (float("-inf"), -1, -1, 0, 0)
        probability = float((log_start[i, s] + log_end[i, e]).exp()) if found else 0.0
        rows.append([float(batch["example_index"][i]), score, first, last, probability,
                     float(start[i, 0] + end[i, 0])])
    return torch.tensor(rows, dtype=torch.float64, device=start.device)


def pick_answers(windows: list[list[float]], contexts: list[str], unanswerable: bool,
                 null_threshold: float) -> list[tuple[str, float, int, int]]:
    """(answer, probability, start, end) per question from its windows' best spans."""
    best: dict[int, list] = {}
    null: dict[int, float] = {}
    for index, score, first, last, probability, no_answer in windows:
        index = int(index)
        null[index] = min(null.get(index, no_answer), no_answer)
        if index not in best or score > best[index][0]:
            best[index] = [score, int(first), int(last), probability]
    answers = []
    for index, context in enumerate(contexts):
        score, first, last, probability = best.get(index, [float("-inf"), -1, -1, 0.0])
        if first < 0 or unanswerable and null[index] > score + null_threshold:
            answers.append(("", 0.0, -1, -1))
        else:
            answers.append((context[first:last], probability, first, last))
    return answers


@torch.inference_mode()
def answer_split(model, loader, accelerator, recipe: Recipe):
    """Every window's best span, gathered across processes, and the mean window loss."""
    model.eval()
    windows, loss, count = [], 0.0, 0
    for batch in loader:
        start, end = _logits(model, batch)
        found = window_answers(start, end, batch, recipe.eval.n_best,
                               recipe.eval.max_answer_length)
        summed = (nn.functional.cross_entropy(start, batch["labels"][:, 0], reduction="none") +
                  nn.functional.cross_entropy(end, batch["labels"][:, 1], reduction="none")) / 2
        found, summed = accelerator.gather_for_metrics((found, summed))
        windows += found.tolist()
        loss, count = loss + float(summed.sum()), count + summed.numel()
    return windows, loss / max(count, 1)


def evaluator(recipe: Recipe, examples_of: dict, unanswerable: bool):
    """evaluate(model, loader, accelerator): the questions behind a loader are found by its
    windows' dataset (a prepared loader keeps the same one)."""
    def evaluate(model, loader, accelerator, final=False):
        examples = examples_of[id(loader.dataset)]
        windows, loss = answer_split(model, loader, accelerator, recipe)
        answers = pick_answers(windows, examples["context"], unanswerable,
                               recipe.eval.null_threshold)
        result = squad_scores([a[0] for a in answers], examples["answer_text"])
        return result | {"loss": loss, "windows": len(windows)}
    return evaluate


def load_qa_model(path: str, recipe: Recipe) -> nn.Module:
    from transformers import AutoModelForQuestionAnswering
    return load_pretrained(AutoModelForQuestionAnswering, path, recipe)


def _loaders(recipe: Recipe, tokenizer, splits: dict, examples_of: dict) -> dict:
    windows = encode_splits(splits, tokenizer, recipe.model.max_length, recipe.data.doc_stride)
    collate = collate_windows(tokenizer)
    loaders = {}
    for split, dataset in windows.items():
        train = split == "train"
        if not train:
            examples_of[id(dataset)] = splits[split]
        loaders[split] = make_loader(
            dataset, recipe.train.batch_size if train else recipe.eval.batch_size,
            collate=collate, train=train, seed=recipe.train.seed,
            group_by_length=train and recipe.train.group_by_length)
    return loaders


def prepare(recipe: Recipe, say) -> Task:
    data = load_qa_data(recipe)
    say(format_report(data))
    path = resolve_model_path(recipe.model.name, recipe)
    tokenizer = load_tokenizer(path, recipe)
    model = load_qa_model(path, recipe)
    report = apply_strategy(model, recipe)
    say(f"strategy {recipe.strategy.kind}: {report.describe()}")
    unanswerable = any(not answers for answers in data.splits["train"]["answer_text"])
    examples_of: dict = {}
    loaders = _loaders(recipe, tokenizer, data.splits, examples_of)
    if unknown := format_unknown_tokens(unknown_token_rate(loaders["train"].dataset,
                                                           tokenizer), recipe.model.name):
        say(unknown)
    say(f"train: {len(data.splits['train'])} questions in {len(loaders['train'].dataset)} "
        f"windows of {recipe.model.max_length} tokens (stride {recipe.data.doc_stride})"
        + (", some unanswerable" if unanswerable else ""))

    def save(unwrapped: nn.Module, run_dir: Path, precision: str) -> None:
        save_artifact(unwrapped, tokenizer, run_dir, recipe.strategy.kind in PEFT_KINDS,
                      {"task": "question_answering", "unanswerable": unanswerable,
                       "base_model": path, "precision": precision})

    return Task(report=report, loaders=loaders, batch_loss=summed_span_loss,
                count_items=count_windows,
                evaluate=evaluator(recipe, examples_of, unanswerable), save=save,
                default_metric="f1", history_keys=("f1", "exact_match", "loss"),
                summary={"unanswerable": unanswerable})


def load(folder: Path, recipe: Recipe, info: dict, dequantize: bool):
    return load_artifact(folder, recipe, info, dequantize,
                         lambda path: load_qa_model(path, recipe))


def eval_loaders(recipe: Recipe, tokenizer, info: dict, data_file: str | None):
    if data_file:
        splits = dict(load_eval_file(data_file, recipe))
    else:
        splits = {s: d for s, d in load_qa_data(recipe).splits.items() if s != "train"}
    examples_of: dict = {}
    loaders = _loaders(recipe, tokenizer, splits, examples_of)
    return loaders, evaluator(recipe, examples_of, info.get("unanswerable", False))


def answer_questions(model, tokenizer, recipe: Recipe, questions: list[str],
                     contexts: list[str], unanswerable: bool, precision: str = "no"):
    """(answer, probability, start, end) per question; start/end are character offsets
    into its context (-1 with an empty answer)."""
    import datasets
    rows = {"question": questions, "context": contexts, "answer_text": [[]] * len(questions),
            "answer_start": [[]] * len(questions)}
    examples = datasets.Dataset.from_dict(rows)
    windows = encode_splits({"p": examples}, tokenizer, recipe.model.max_length,
                            recipe.data.doc_stride, cache=False)["p"]
    device = next(model.parameters()).device
    collate, found = collate_windows(tokenizer), []
    for start in range(0, len(windows), recipe.eval.batch_size):
        batch = collate([windows[i] for i in range(start, min(start + recipe.eval.batch_size,
                                                                  len(windows)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode(), precision_context(precision, device):
            start_logits, end_logits = _logits(model, batch)
        found += window_answers(start_logits, end_logits, batch, recipe.eval.n_best,
                                recipe.eval.max_answer_length).tolist()
    return pick_answers(found, contexts, unanswerable, recipe.eval.null_threshold)


def predict(args, run_dir: Path, info: dict) -> None:
    """--question/--context pairs: one JSON line each; --file: its rows with answer, score,
    start and end columns."""
    from peftlab.artifacts import load_trained
    questions, contexts = args.question or [], args.context or []
    if len(questions) != len(contexts) or not (questions or args.file):
        raise PeftlabError("predict: a QA run; give --question \"...\" --context \"...\" "
                           "(as many of each) or --file in.csv --output out.jsonl")
    model, tokenizer, recipe, info = load_trained(run_dir)
    unanswerable = info.get("unanswerable", False)
    for question, context, (answer, score, first, last) in zip(
            questions, contexts, answer_questions(model, tokenizer, recipe, questions,
                                                  contexts, unanswerable, info["precision"])):
        print(json.dumps({"question": question, "answer": answer, "score": round(score, 6),
                          "start": first, "end": last}, ensure_ascii=False))
    if args.file:
        from peftlab.sources import read_source
        data = recipe.data
        table = read_source(args.file, "auto", data.question_column, "").to_pandas()
        for column, key in ((data.question_column, "question_column"),
                            (data.context_column, "context_column")):
            if column not in table.columns:
                raise PeftlabError(f"{args.file}: no column '{column}' (columns: "
                                   f"{', '.join(map(str, table.columns))}); set data.{key}")
        answers = answer_questions(model, tokenizer, recipe,
                                   table[data.question_column].astype(str).tolist(),
                                   table[data.context_column].astype(str).tolist(),
                                   unanswerable, info["precision"])
        for position, key in enumerate(("answer", "score", "start", "end")):
            table[key] = [found[position] for found in answers]
        if Path(args.output).suffix.lower() in (".json", ".jsonl"):
            table.to_json(args.output, orient="records", lines=True, force_ascii=False)
        else:
            table.to_csv(args.output, index=False)
        print(f"wrote {len(table)} answers to {args.output}")


def meta_model(config, recipe: Recipe) -> nn.Module:
    from transformers import AutoModelForQuestionAnswering
    with torch.device("meta"):
        return AutoModelForQuestionAnswering.from_config(config)


def plan_census(config, recipe: Recipe) -> None:
    return None  # the planner's closed-form transformer terms size it (memory.py)


def output_bytes(recipe: Recipe, tokens: int, vocab: int, training: bool) -> float:
    return 0.0  # two logits per token


def frozen_cache_bytes(recipe: Recipe, kind: str, hidden: int, precision: str) -> float:
    return 0.0  # no frozen-feature cache for this task (train.cache_frozen: true is refused)


def serve_routes(app, served, auth) -> None:
    from peftlab.tasks.question_answering_serve import add_routes
    add_routes(app, served, auth)
