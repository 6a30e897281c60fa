"""NER and extractive QA side by side: peftlab full and LoRA against the same job as a plain
HF Trainer script (benchmarks/hf_trainer_ner.py / hf_trainer_qa.py, in the style of
transformers' run_ner.py / run_qa.py), interleaved in one invocation.

Each round runs every configuration once, in its own process, in a rotated order. Both sides
get the recipe's model, data, epochs, lr, batch, max length, weight decay, warmup and seed,
and the LoRA rank/alpha of the LoRA recipe; neither evaluates inside the loop or checkpoints.
Scores are on test. NER: peftlab's are over every gold word (a word cut off by max_length
counts as O); the Trainer script's over the words the tokenizer kept, as run_ner.py does (at
max_length 128 CoNLL-2003 loses almost none). QA: XQuAD-en has no train split; peftlab's
article-wise split (seeded) is written out as SQuAD JSON for the Trainer script, so both
train and test on the same questions; `trainer_untrained` scores the pretrained body with a
fresh span head, untrained (the floor the task's target is measured from).

Usage: PEFTLAB_DATA=../shared/data python benchmarks/tasks.py --task ner|qa [--rounds 1]
           [--configs peftlab_full,peftlab_lora,trainer_full,trainer_lora]
           [--precision bf16] [--set train.epochs=1 ...] [--tag tasks_<task>_cpu]
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
RECIPES = {"ner": {"full": "recipes/minilm_conll2003_full.yaml",
                   "lora": "recipes/minilm_conll2003_lora.yaml"},
           "qa": {"full": "recipes/minilm_xquad_en_full.yaml",
                  "lora": "recipes/minilm_xquad_en_lora.yaml",
                  "untrained": "recipes/minilm_xquad_en_full.yaml"}}
SCORES = {"ner": ("f1", "precision", "recall", "accuracy"), "qa": ("f1", "exact_match"),
          "images": ("accuracy",)}  # images: benchmarks/images.py
COMMON = ["train.keep_checkpoints=0", "train.report_to=[none]"]


def overrides(args) -> list[str]:
    # one evaluation, after training (epochs is a float: a huge period never fires mid-run)
    return [*COMMON, "train.eval_every_steps=1000000", f"train.mixed_precision={args.precision}",
            *args.set]


def run_peftlab(args, kind: str, out: Path) -> dict:
    extra = overrides(args)
    recipe_path = RECIPES[args.task][kind]
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftlab", "train", recipe_path, *extra,
                    "--output-dir", str(out), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((out / "summary.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]
    record = {"wall_seconds": round(wall, 2),
              "train_seconds": round(summary["train_seconds"] - summary["eval_seconds"], 2),
              "peak_memory_mb": summary["peak_memory_mb"], "steps": summary["steps"],
              "trainable_params": summary["trainable_params"],
              "test": {k: test[k] for k in SCORES[args.task]},
              "command": " ".join(["peftlab train", recipe_path, *extra])}
    if "per_type" in test:
        record["test_per_type_f1"] = {k: v["f1"] for k, v in test["per_type"].items()}
    return record


def squad_json(split, path: Path) -> str:
    """A peftlab QA split as SQuAD v1.1 JSON (one paragraph per question), for the script."""
    articles: dict[str, list] = {}
    for row in split:
        articles.setdefault(row["title"], []).append({"context": row["context"], "qas": [{
            "id": row["id"], "question": row["question"], "answers": [
                {"text": t, "answer_start": s}
                for t, s in zip(row["answer_text"], row["answer_start"])]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [
        {"title": title, "paragraphs": paragraphs} for title, paragraphs in articles.items()]}))
    return str(path)


def run_trainer(args, kind: str, out: Path) -> dict:
    recipe = load_recipe(RECIPES[args.task][kind], overrides(args))
    data, train, strategy = recipe.data, recipe.train, recipe.strategy
    out.mkdir(parents=True, exist_ok=True)
    script = {"ner": "hf_trainer_ner.py", "qa": "hf_trainer_qa.py"}[args.task]
    command = [sys.executable, str(Path(__file__).parent / script),
               "--model", resolve_model_path(recipe.model.name, recipe),
               "--epochs", str(train.epochs), "--lr", str(train.lr),
               "--batch", str(train.batch_size), "--eval-batch", str(recipe.eval.batch_size),
               "--max-length", str(recipe.model.max_length),
               "--weight-decay", str(train.weight_decay), "--warmup-ratio",
               str(train.warmup_ratio), "--seed", str(train.seed), "--precision",
               args.precision, "--out", str(out / "trainer.json")]
    if args.task == "ner":
        command += [flag for split in ("train", "validation", "test") for flag in (
            f"--{split}", resolve_data_path(getattr(data, split), recipe))]
        if data.max_train_samples:
            command += ["--max-train-samples", str(data.max_train_samples)]
    else:
        from peftlab.tasks.qa_data import load_qa_data
        splits = load_qa_data(recipe).splits  # peftlab's article-wise split, the same here
        command += ["--train", squad_json(splits["train"], out / "train.json"),
                    "--test", squad_json(splits["test"], out / "test.json"),
                    "--doc-stride", str(data.doc_stride),
                    "--n-best", str(recipe.eval.n_best),
                    "--max-answer-length", str(recipe.eval.max_answer_length)]
        if kind == "untrained":
            command.append("--untrained")
    if kind == "lora":
        command += ["--lora-r", str(strategy.lora_r), "--lora-alpha", str(strategy.lora_alpha)]
    tick = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    result = json.loads((out / "trainer.json").read_text())
    return {"wall_seconds": round(wall, 2), "train_seconds": result["train_seconds"],
            "peak_memory_mb": result["peak_memory_mb"], "steps": result["steps"],
            "trainable_params": result["trainable_params"],
            "test": {k: result["test"][k] for k in SCORES[args.task]},
            "command": " ".join(["python", *command[1:]])}


def markdown(records: list[dict], task: str) -> str:
    scores = SCORES[task]
    planned = any("predicted_peak_mb" in record for record in records)
    lines = ["| config | " + " | ".join(f"test {k}" for k in scores) +
             " | train | wall | peak RSS |" + (" planned (blind) |" if planned else "") +
             " trainable |", "|---|" + "---|" * (len(scores) + 4 + planned)]
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(record["config"], []).append(record)
    scale = 1 if task == "qa" else 100  # SQuAD's scores are percentages, the others shares
    for config, rows in groups.items():
        def cell(get, fmt, rows=rows):
            values = [get(row) for row in rows]
            middle = statistics.median(values)
            return f"{middle:{fmt}}" + (f" ({min(values):{fmt}}-{max(values):{fmt}})"
                                        if len(values) > 1 else "")
        cells = [cell(lambda r, k=k: scale * r["test"][k], ".2f") for k in scores]
        lines.append(f"| {config} | " + " | ".join(cells) +
                     f" | {cell(lambda r: r['train_seconds'], '.0f')} s | "
                     f"{cell(lambda r: r['wall_seconds'], '.0f')} s | "
                     f"{cell(lambda r: r['peak_memory_mb'], ',.0f')} MB | " +
                     (("- | " if "predicted_peak_mb" not in rows[0] else
                       f"{cell(lambda r: r['predicted_peak_mb'], ',.0f')} MB | ")
                      if planned else "") + f"{rows[0]['trainable_params']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(RECIPES), default="ner")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--configs", default="peftlab_full,peftlab_lora,trainer_full,"
                                             "trainer_lora")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    parser.add_argument("--tag", help="default: tasks_<task>_cpu")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    args.tag = args.tag or f"tasks_{args.task}_cpu"
    interleave(args, "tasks.py", run_peftlab, run_trainer, {"precision": args.precision})


def interleave(args, script: str, run_peftlab, run_trainer, fields: dict) -> None:
    """Every config of args.configs once per round, rotated; results/<tag>.json is written
    after every job (a long run keeps its part), the markdown table at the end."""
    configs = args.configs.split(",")
    records = []
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            side, kind = config.split("_", 1)
            out = Path("runs/bench") / args.tag / f"r{round_index}_{config}"
            record = (run_peftlab if side == "peftlab" else run_trainer)(args, kind, out)
            records.append({"config": config, "round": round_index} | fields | record)
            print(json.dumps(records[-1]), flush=True)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.tag}.json").write_text(json.dumps(
                {"command": " ".join([f"python benchmarks/{script}", *sys.argv[1:]]),
                 "machine": machine(), "records": records}, indent=2))
    table = markdown(records, args.task)
    (RESULTS / f"{args.tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
