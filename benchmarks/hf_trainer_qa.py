"""The extractive-QA job as a plain HF `Trainer` script in the style of transformers'
run_qa.py (prepare_train_features / prepare_validation_features / postprocess_qa_predictions).

It reads the SQuAD JSON splits benchmarks/tasks.py writes (the same article-wise split
peftlab makes), windows contexts with doc_stride, points windows that miss the answer at
[CLS], trains AutoModelForQuestionAnswering (optionally with a peft LoRA adapter, the span
head in modules_to_save), then picks each question's answer from the n-best starts and ends
of all its windows. EM/F1 use peftlab's SQuAD scorer (the official script's rules; evaluate's
`squad` is a Hub script that cannot load offline), so both sides are scored identically.
`--untrained`: no training, the pretrained body with a fresh span head.
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
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peftlab.tasks.qa_metrics import squad_scores  # the scorer only


def read_squad(path: str) -> dict[str, list]:
    rows = {"id": [], "question": [], "context": [], "answers": []}
    for article in json.loads(Path(path).read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows["id"].append(qa["id"])
                rows["question"].append(qa["question"])
                rows["context"].append(paragraph["context"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [a["answer_start"] for a in qa["answers"]]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--train", "--test", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=["bf16", "no"], default="bf16")
    parser.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--n-best", type=int, default=20)
    parser.add_argument("--max-answer-length", type=int, default=30)
    parser.add_argument("--untrained", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def train_features(batch):
        encoded = tokenizer(batch["question"], batch["context"], truncation="only_second",
                            max_length=args.max_length, stride=args.doc_stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        owners = encoded.pop("overflow_to_sample_mapping")
        starts, ends = [], []
        for i, offsets in enumerate(encoded.pop("offset_mapping")):
            answers = batch["answers"][owners[i]]
            sequence = encoded.sequence_ids(i)
            first = sequence.index(1)
            last = len(sequence) - 1 - sequence[::-1].index(1)
            begin = answers["answer_start"][0]
            end = begin + len(answers["text"][0])
            if offsets[first][0] > begin or offsets[last][1] < end:
                starts.append(0)
                ends.append(0)
                continue
            while first < len(offsets) and offsets[first][0] <= begin:
                first += 1
            starts.append(first - 1)
            while offsets[last][1] >= end:
                last -= 1
            ends.append(last + 1)
        encoded["start_positions"], encoded["end_positions"] = starts, ends
        return encoded

    def eval_features(batch):
        encoded = tokenizer(batch["question"], batch["context"], truncation="only_second",
                            max_length=args.max_length, stride=args.doc_stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        owners = encoded.pop("overflow_to_sample_mapping")
        encoded["example_id"] = [batch["id"][owner] for owner in owners]
        encoded["offset_mapping"] = [
            [o if encoded.sequence_ids(i)[k] == 1 else None for k, o in enumerate(offsets)]
            for i, offsets in enumerate(encoded["offset_mapping"])]
        return encoded

    train = Dataset.from_dict(read_squad(args.train))
    test = Dataset.from_dict(read_squad(args.test))
    train_windows = train.map(train_features, batched=True, remove_columns=train.column_names)
    test_windows = test.map(eval_features, batched=True, remove_columns=test.column_names)
    model = AutoModelForQuestionAnswering.from_pretrained(args.model)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            task_type="QUESTION_ANS", r=args.lora_r, lora_alpha=args.lora_alpha,
            target_modules=["query", "key", "value", "dense"]))  # the encoder's linears
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    training = TrainingArguments(
        output_dir=str(Path(args.out).parent / "trainer_out"), num_train_epochs=args.epochs,
        learning_rate=args.lr, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.eval_batch, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # below 1: a ratio of the steps, in transformers 5
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=args.seed,
        bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        eval_strategy="no", save_strategy="no", report_to=[], logging_steps=50,
        train_sampling_strategy="group_by_length", dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=train_windows,
                      data_collator=DataCollatorWithPadding(tokenizer))
    tick = time.perf_counter()
    steps = 0 if args.untrained else trainer.train().global_step
    train_seconds = time.perf_counter() - tick
    # transformers 5's length grouping also shuffles the evaluation sampler (Trainer.
    # _get_eval_sampler), so predictions would not come back in window order: sequential
    trainer.args.train_sampling_strategy = "random"
    output = trainer.predict(test_windows.remove_columns(["example_id", "offset_mapping"]))
    start_logits, end_logits = output.predictions
    by_example: dict[str, list[int]] = {}
    for i, example_id in enumerate(test_windows["example_id"]):
        by_example.setdefault(example_id, []).append(i)
    predictions = []
    for example in test:
        best, context = None, example["context"]
        for i in by_example[example["id"]]:
            offsets = test_windows[i]["offset_mapping"]
            starts = np.argsort(start_logits[i])[-1:-args.n_best - 1:-1]
            ends = np.argsort(end_logits[i])[-1:-args.n_best - 1:-1]
            for s in starts:
                for e in ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or \
                            offsets[e] is None or e < s or e - s + 1 > args.max_answer_length:
                        continue
                    score = start_logits[i][s] + end_logits[i][e]
                    if best is None or score > best[0]:
                        best = (score, context[offsets[s][0]:offsets[e][1]])
        predictions.append(best[1] if best else "")
    scores = squad_scores(predictions, [example["answers"]["text"] for example in test])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"train_seconds": round(train_seconds, 2), "steps": steps,
              "trainable_params": trainable, "peak_memory_mb": round(peak, 1), "test": scores}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
