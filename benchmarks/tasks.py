"""NER (and later QA) side by side: peftlab full and LoRA against the same job as a plain HF
Trainer script (benchmarks/hf_trainer_ner.py, in the style of run_ner.py), interleaved.

Each round runs every configuration once, in its own process, in a rotated order. Both sides
get the recipe's model, data, epochs, lr, batch, max length, weight decay, warmup and seed,
and the LoRA rank/alpha of the LoRA recipe; neither evaluates inside the loop or checkpoints.
Scores are on test: peftlab's are over every gold word (a word cut off by max_length counts
as O); the Trainer script's over the words the tokenizer kept, as run_ner.py does (at
max_length 128 CoNLL-2003 loses almost none).

Usage: PEFTLAB_DATA=../shared/data python benchmarks/tasks.py [--rounds 1]
           [--configs peftlab_full,peftlab_lora,trainer_full,trainer_lora]
           [--precision bf16] [--set train.epochs=1 ...] [--tag tasks_conll2003_cpu]
Writes benchmarks/results/<tag>.json and <tag>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine
from peftlab.config import load_recipe, resolve_data_path
from peftlab.models import resolve_model_path

RESULTS = Path(__file__).parent / "results"
RECIPES = {"full": "recipes/minilm_conll2003_full.yaml",
           "lora": "recipes/minilm_conll2003_lora.yaml"}
COMMON = ["train.keep_checkpoints=0", "output.tensorboard=false"]


def overrides(args) -> list[str]:
    # one evaluation, after training (epochs is a float: a huge period never fires mid-run)
    return [*COMMON, "train.eval_every_steps=1000000", f"train.mixed_precision={args.precision}",
            *args.set]


def run_peftlab(args, kind: str, out: Path) -> dict:
    extra = overrides(args)
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftlab", "train", RECIPES[kind], *extra,
                    "--output-dir", str(out), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((out / "summary.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]
    return {"wall_seconds": round(wall, 2),
            "train_seconds": round(summary["train_seconds"] - summary["eval_seconds"], 2),
            "peak_memory_mb": summary["peak_memory_mb"], "steps": summary["steps"],
            "trainable_params": summary["trainable_params"],
            "test": {k: test[k] for k in ("f1", "precision", "recall", "accuracy")},
            "test_per_type_f1": {k: v["f1"] for k, v in test["per_type"].items()},
            "command": " ".join(["peftlab train", RECIPES[kind], *extra])}


def run_trainer(args, kind: str, out: Path) -> dict:
    recipe = load_recipe(RECIPES[kind], overrides(args))
    data, train, strategy = recipe.data, recipe.train, recipe.strategy
    command = [sys.executable, str(Path(__file__).parent / "hf_trainer_ner.py"),
               "--model", resolve_model_path(recipe.model.name, recipe),
               *[flag for split in ("train", "validation", "test") for flag in (
                   f"--{split}", resolve_data_path(getattr(data, split), recipe))],
               "--epochs", str(train.epochs), "--lr", str(train.lr),
               "--batch", str(train.batch_size), "--eval-batch", str(recipe.eval.batch_size),
               "--max-length", str(recipe.model.max_length),
               "--weight-decay", str(train.weight_decay), "--warmup-ratio",
               str(train.warmup_ratio), "--seed", str(train.seed), "--precision",
               args.precision, "--out", str(out / "trainer.json")]
    if kind == "lora":
        command += ["--lora-r", str(strategy.lora_r), "--lora-alpha", str(strategy.lora_alpha)]
    if data.max_train_samples:
        command += ["--max-train-samples", str(data.max_train_samples)]
    out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    result = json.loads((out / "trainer.json").read_text())
    return {"wall_seconds": round(wall, 2), "train_seconds": result["train_seconds"],
            "peak_memory_mb": result["peak_memory_mb"], "steps": result["steps"],
            "trainable_params": result["trainable_params"],
            "test": {k: result["test"][k] for k in ("f1", "precision", "recall", "accuracy")},
            "command": " ".join(["python", *command[1:]])}


def markdown(records: list[dict]) -> str:
    lines = ["| config | test F1 | precision | recall | train | wall | peak RSS | trainable |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(record["config"], []).append(record)
    for config, rows in groups.items():
        def cell(get, fmt, rows=rows):
            values = [get(row) for row in rows]
            middle = statistics.median(values)
            return f"{middle:{fmt}}" + (f" ({min(values):{fmt}}-{max(values):{fmt}})"
                                        if len(values) > 1 else "")
        lines.append(f"| {config} | {cell(lambda r: 100 * r['test']['f1'], '.2f')} | "
                     f"{cell(lambda r: 100 * r['test']['precision'], '.2f')} | "
                     f"{cell(lambda r: 100 * r['test']['recall'], '.2f')} | "
                     f"{cell(lambda r: r['train_seconds'], '.0f')} s | "
                     f"{cell(lambda r: r['wall_seconds'], '.0f')} s | "
                     f"{cell(lambda r: r['peak_memory_mb'], ',.0f')} MB | "
                     f"{rows[0]['trainable_params']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--configs", default="peftlab_full,peftlab_lora,trainer_full,"
                                             "trainer_lora")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    parser.add_argument("--tag", default="tasks_conll2003_cpu")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    configs = args.configs.split(",")
    records = []
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            side, kind = config.split("_")
            out = Path("runs/bench") / args.tag / f"r{round_index}_{config}"
            record = (run_peftlab if side == "peftlab" else run_trainer)(args, kind, out)
            records.append({"config": config, "round": round_index,
                            "precision": args.precision} | record)
            print(json.dumps(records[-1]), flush=True)
            RESULTS.mkdir(exist_ok=True)  # written after every job: a long run keeps its part
            (RESULTS / f"{args.tag}.json").write_text(json.dumps(
                {"command": " ".join(["python benchmarks/tasks.py", *sys.argv[1:]]),
                 "machine": machine(), "records": records}, indent=2))
    table = markdown(records)
    (RESULTS / f"{args.tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
