"""The same LoRA job written the usual way, with HF `Trainer` + PEFT, as a baseline to beat.

Three ways, as people write them:
- seeds: `padding="max_length"` at tokenization, Trainer defaults (the way the seed scripts do it)
- tuned: dynamic padding (DataCollatorWithPadding)
- strong: dynamic padding and length-grouped batches: the fairest rival

Everything else comes from the peftlab recipe, so both sides train the same job: data, model,
LoRA rank/alpha/dropout/targets ("all-linear": peftlab's default set, the new head trained in
full), batch, accumulation, steps, lr, weight decay (never on biases and norms, on both
sides), warmup, schedule, clipping and seed. `--precision bf16|no` is explicit (bf16 is
emulated, slower but correct, on a CPU without it). Timed like peftlab: the median optimizer
step, the training loop (Trainer's train_runtime, no evaluation inside), and the wall time of
the whole command (measured by the caller). Peak memory: the process's peak RSS, or CUDA max
allocated.

Usage: python benchmarks/hf_trainer_baseline.py --mode seeds|tuned|strong --precision bf16|no
       --recipe R --out F.json [--max-steps N] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from peftlab.config import load_recipe
from peftlab.hardware import peak_memory_mb, peak_reserved_mb
from peftlab.models import resolve_model_path
from peftlab.optimizers import DEFAULT_LR
from peftlab.tasks.classification_data import load_labelled_data


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, like peftlab's median_step_seconds."""

    def __init__(self):
        self.times, self._tick = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._tick = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._tick)


def tokenize(splits, tokenizer, max_length: int, mode: str):
    padding = "max_length" if mode == "seeds" else False

    def encode(rows):
        return tokenizer(rows["text"], truncation=True, max_length=max_length, padding=padding)
    return splits.map(encode, batched=True, remove_columns=["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["seeds", "tuned", "strong"], required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", choices=["bf16", "no"], required=True)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    cfg, strategy = recipe.train, recipe.strategy
    data = load_labelled_data(recipe)
    path = resolve_model_path(recipe.model.name, recipe)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenized = tokenize(data.splits, tokenizer, recipe.model.max_length, args.mode)
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(data.label_names))
    model = get_peft_model(model, LoraConfig(
        task_type="SEQ_CLS", r=strategy.lora_r, lora_alpha=strategy.lora_alpha,
        lora_dropout=strategy.lora_dropout, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bf16 = args.precision == "bf16"
    training_args = TrainingArguments(
        output_dir=f"runs/bench/hf_trainer_{args.mode}", report_to=[],
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr or DEFAULT_LR["lora"],
        max_steps=args.max_steps or cfg.max_steps or -1, num_train_epochs=cfg.epochs,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # below 1: a ratio of the steps, in transformers 5
        lr_scheduler_type=cfg.scheduler, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        save_strategy="no", eval_strategy="no", logging_steps=50, bf16=bf16,
        train_sampling_strategy="group_by_length" if args.mode == "strong" else "random",
        use_cpu=cfg.cpu or not torch.cuda.is_available())
    timer = StepTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=tokenized["train"],
                      data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer, callbacks=[timer])
    train_metrics = trainer.train().metrics
    predictions = trainer.predict(tokenized["validation"])
    accuracy = float(np.mean(predictions.predictions.argmax(-1) == predictions.label_ids))
    device = trainer.args.device
    real_tokens = np.mean([sum(m) for m in tokenized["train"]["attention_mask"]])
    samples_per_second = train_metrics["train_samples_per_second"]
    record = {
        "strategy": f"hf_trainer_{args.mode}", "mode": args.mode, "trainable_params": trainable,
        "steps": trainer.state.global_step, "precision": args.precision,
        "weight_decay": training_args.weight_decay, "lr": training_args.learning_rate,
        "train_seconds": round(train_metrics["train_runtime"], 2),
        "samples_per_second": round(samples_per_second, 2),
        "tokens_per_second": round(samples_per_second * real_tokens, 1),
        "median_step_seconds": round(statistics.median(timer.times), 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "peak_reserved_mb": peak_reserved_mb(device),
        "validation_accuracy": accuracy, "device": str(device),
    }
    Path(args.out).write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
