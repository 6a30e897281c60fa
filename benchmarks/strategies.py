"""Every strategy on the same model, data and budget, side by side, each in its own process.

For each strategy: trainable params, peak memory (CPU: the process's peak RSS; GPU: max
allocated and reserved) next to `peftlab plan`'s prediction, median step time, samples/s and
tokens/s, FLOP utilisation against a matmul rate measured in this run, wall time and the final
validation metric. The planner's prediction of each run is written to its results file
before the run starts and never recomputed (a changed planner means running this again).
The comparison with HF Trainer is benchmarks/vs_trainer.py (interleaved rounds). Writes
results/<tag>_<kind>.json, results/<tag>.md (table) and results/<tag>.png (accuracy vs peak
memory).

Usage (the committed CPU results):
  PEFTLAB_DATA=../shared/data python benchmarks/strategies.py \\
      --recipe recipes/minilm_sst2_lora.yaml --steps 150 \\
      --strategies full,head,freeze,gradual,lora,dora,qlora
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine, planner_fingerprint
from benchmarks.report import plot, table
from peftlab.config import load_recipe
from peftlab.memory import ADAPTER_KINDS, MB, estimate, overhead_bytes, trained_layers
from peftlab.model_shape import shape_of, training_flops_per_token

RESULTS = Path(__file__).parent / "results"
# learning rates of recipes/minilm_sst2_<kind>.yaml; a --set train.lr=... overrides them all
LR = {"full": 8e-5, "freeze": 8e-5, "gradual": 8e-5, "head": 2e-3, "lora": 1e-3,
      "dora": 1e-3, "qlora": 1e-3}
WEIGHT_GRADS = ("full", "freeze", "gradual")


def matmul_gflops(precision: str = "no", size: int = 2048, repeats: int = 7) -> float:
    """Median matmul rate now, on this machine, in the precision the run trains in (bf16 for
    bf16/fp16 runs and on CUDA): MFU's denominator. A bf16 run over an fp32 rate read
    above 100% on a CPU with native bf16."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda or precision in ("bf16", "fp16") else torch.float32
    a = torch.randn(size, size, dtype=dtype, device="cuda" if cuda else "cpu")
    b = torch.randn_like(a)
    rates = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        tick = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        rates.append(2 * size**3 / (time.perf_counter() - tick) / 1e9)
    return statistics.median(rates[1:])


def kind_overrides(kind: str, args) -> list[str]:
    # no checkpoints: the table compares training itself, like the Trainer baselines
    # (save_strategy "no"); summary.json reports checkpoint_seconds apart when they are on
    extra = [f"strategy.kind={kind}", f"train.max_steps={args.steps}",
             "train.eval_every_steps=0", f"train.lr={LR[kind]}", "train.keep_checkpoints=0"]
    if kind == "freeze":
        extra.append(f"strategy.freeze_layers={args.freeze_layers}")
    if kind == "gradual":  # open one group every steps/8, so the top layers all train
        extra.append(f"strategy.unfreeze_every_steps={max(args.steps // 8, 1)}")
    return extra + list(args.set)


def predicted_peak(recipe, shape, kind: str, device: str) -> float:
    overhead = overhead_bytes(recipe, device)
    guess = estimate(shape, recipe, kind, recipe.train.batch_size,
                     recipe.train.gradient_checkpointing, overhead, device)
    return guess.total / MB


def mfu(recipe, shape, kind: str, summary: dict, rate: float) -> float:
    seq = summary["padded_tokens_per_second"] / summary["samples_per_second"]  # mean length
    layers = trained_layers(shape, recipe, kind)
    flops = training_flops_per_token(shape, int(seq), layers, kind in WEIGHT_GRADS,
                                     recipe.strategy.lora_r if kind in ADAPTER_KINDS else 0)
    return flops * summary["padded_tokens_per_second"] / (rate * 1e9)


def run_peftlab(kind: str, args, device: str) -> dict:
    overrides = kind_overrides(kind, args)
    out = Path("runs/bench") / args.tag / kind
    recipe = load_recipe(args.recipe, overrides)
    shape = shape_of(recipe)
    predicted = predicted_peak(recipe, shape, kind, device)
    blind = {"strategy": kind, "tool": "peftlab", "predicted_peak_mb": round(predicted, 1),
             "predicted_at": time.time(), "planner": planner_fingerprint()}
    # the prediction is on disk before the run starts, and nothing recomputes it later
    (RESULTS / f"{args.tag}_{kind}.json").write_text(json.dumps(blind, indent=2))
    command = [sys.executable, "-m", "peftlab", "train", args.recipe, *overrides,
               "--output-dir", str(out), "--overwrite"]
    tick = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    rate = matmul_gflops(summary["precision"])  # right after the run, in its precision
    return blind | {
            "command": "PEFTLAB_DATA=../shared/data peftlab train " +
                       " ".join([args.recipe, *overrides]),
            "trainable_params": summary["trainable_params"],
            "trainable_percent": summary["trainable_percent"],
            "peak_memory_mb": summary["peak_memory_mb"],
            "peak_reserved_mb": summary["peak_reserved_mb"],
            "median_step_seconds": summary["median_step_seconds"],
            "samples_per_second": summary["samples_per_second"],
            "tokens_per_second": summary["tokens_per_second"],
            "matmul_gflops": round(rate, 1),
            # gradual changes what trains as it goes: no single FLOP count per token
            "mfu": None if kind == "gradual" else
            round(mfu(recipe, shape, kind, summary, rate), 4),
            "wall_seconds": round(wall, 1), "train_seconds": summary["train_seconds"],
            "validation_accuracy": metrics["accuracy"],
            "validation_f1_macro": metrics["f1_macro"], "steps": summary["steps"],
            "device": summary["device"], "precision": summary["precision"],
            "machine": machine()}


def write_report(records: list[dict], tag: str) -> None:
    markdown = table(records)
    (RESULTS / f"{tag}.md").write_text(markdown + "\n")
    plot(records, RESULTS / f"{tag}.png")
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--strategies", default="full,head,freeze,gradual,lora,dora,qlora")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument("--freeze-layers", type=int, default=3)
    parser.add_argument("--tag", default="sst2_minilm_cpu", help="results file prefix")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(exist_ok=True)
    records = []
    for kind in args.strategies.split(","):
        records.append(run_peftlab(kind, args, device))
        (RESULTS / f"{args.tag}_{kind}.json").write_text(json.dumps(records[-1], indent=2))
        print(json.dumps({k: v for k, v in records[-1].items() if k != "machine"}), flush=True)
    write_report(records, args.tag)


if __name__ == "__main__":
    main()
