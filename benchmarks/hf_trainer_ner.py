"""The NER job as a plain HF `Trainer` script in the style of transformers' run_ner.py.

It knows nothing of peftlab: it reads the CoNLL files itself, labels each word's first
sub-token (-100 on the rest), pads with DataCollatorForTokenClassification, trains
AutoModelForTokenClassification (optionally with a peft LoRA adapter, the head in
modules_to_save) and scores test with seqeval on the words the tokenizer kept, as run_ner.py
does. Every hyperparameter comes on the command line; benchmarks/tasks.py passes the
recipe's.

Usage: python benchmarks/hf_trainer_ner.py --model PATH --train T --validation V --test X
           --epochs 3 --lr 1e-4 --batch 32 --max-length 128 [--lora-r 16 ...] --out out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
)


def read_conll(path: str) -> dict[str, list]:
    tokens, tags, words, labels = [], [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines() + [""]:
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                tokens.append(words)
                tags.append(labels)
            words, labels = [], []
            continue
        words.append(fields[0])
        labels.append(fields[-1])
    return {"tokens": tokens, "tags": tags}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--train", "--validation", "--test", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=["bf16", "no"], default="bf16")
    parser.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--max-train-samples", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    raw = {split: read_conll(path) for split, path in
           (("train", args.train), ("validation", args.validation), ("test", args.test))}
    if args.max_train_samples:
        raw["train"] = {k: v[:args.max_train_samples] for k, v in raw["train"].items()}
    names = ["O"] + sorted({t for tags in raw["train"]["tags"] for t in tags} - {"O"},
                           key=lambda t: (t[2:], t[0]))
    index = {name: i for i, name in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def align(batch):
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True,
                            max_length=args.max_length)
        labels = []
        for row, tags in enumerate(batch["tags"]):
            previous, row_labels = None, []
            for word in encoded.word_ids(row):
                row_labels.append(-100 if word is None or word == previous else index[tags[word]])
                previous = word
            labels.append(row_labels)
        encoded["labels"] = labels
        return encoded

    data = {split: Dataset.from_dict(rows).map(align, batched=True,
                                               remove_columns=["tokens", "tags"])
            for split, rows in raw.items()}
    model = AutoModelForTokenClassification.from_pretrained(
        args.model, num_labels=len(names), id2label=dict(enumerate(names)), label2id=index)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            task_type="TOKEN_CLS", r=args.lora_r, lora_alpha=args.lora_alpha,
            # every linear layer of the encoder (peftlab's default); the tag head trains in
            # full through TOKEN_CLS's modules_to_save
            target_modules=["query", "key", "value", "dense"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def compute_metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=-1)
        gold_rows, predicted_rows = [], []
        for pred_row, gold_row in zip(predicted, prediction.label_ids):
            keep = gold_row != -100
            gold_rows.append([names[t] for t in gold_row[keep]])
            predicted_rows.append([names[t] for t in pred_row[keep]])
        return {"precision": precision_score(gold_rows, predicted_rows),
                "recall": recall_score(gold_rows, predicted_rows),
                "f1": f1_score(gold_rows, predicted_rows),
                "accuracy": accuracy_score(gold_rows, predicted_rows)}

    training = TrainingArguments(
        output_dir=str(Path(args.out).parent / "trainer_out"), num_train_epochs=args.epochs,
        learning_rate=args.lr, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.eval_batch, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # below 1: a ratio of the steps, in transformers 5
        lr_scheduler_type="linear", max_grad_norm=1.0,
        seed=args.seed, bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        eval_strategy="no", save_strategy="no", report_to=[], logging_steps=50,
        train_sampling_strategy="group_by_length", dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=data["train"],
                      data_collator=DataCollatorForTokenClassification(tokenizer),
                      compute_metrics=compute_metrics)
    tick = time.perf_counter()
    trained = trainer.train()
    train_seconds = time.perf_counter() - tick
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"train_seconds": round(train_seconds, 2), "steps": trained.global_step,
              "trainable_params": trainable, "peak_memory_mb": round(peak, 1),
              "test": {k.removeprefix("test_"): v for k, v in test.items()},
              "tags": names}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
