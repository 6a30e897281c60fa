"""peftlab against HF Trainer + PEFT on the same LoRA job, interleaved in one invocation.

Each round runs every configuration once, in its own process, in a rotated order, for every
precision asked; a noisy neighbour then slows all of them alike, and the spread of the
per-round ratios shows how much the machine moved. Both sides train the same job: the
recipe's data, model, LoRA targets, batch, steps, lr, weight decay, warmup, schedule,
clipping and seed (benchmarks/hf_trainer_baseline.py reads them from the recipe), no test
split, no checkpoints, no evaluation inside the loop, no trackers. Time is counted the same
way on both sides:
- median optimizer step;
- the training loop (peftlab: train_seconds minus evaluation and checkpoints; Trainer:
  train_runtime);
- wall: the whole command, start to exit (reading and tokenizing data, loading the model,
  training, the final validation pass).
Peak memory is each process's peak RSS (CUDA: max allocated). peftlab's planner prediction is
written into its record before its run starts, and never recomputed.

Configurations: peftlab; two settings peftlab had before, kept to measure them beside it:
peftlab_mmap (glibc's mmap threshold fixed at 128 KiB) and peftlab_onednn1024 (oneDNN's
default primitive cache of 1,024 shapes instead of peftlab's 64); peftlab_full (the same job
fine-tuning every weight: peftlab / peftlab_full is LoRA's step over full's);
peftlab_torch_sdpa and peftlab_full_torch_sdpa (the two with torch's SDPA for attention
dropout instead of peftlab/fast_attention.py; the planner predicts the same peak for both
paths); peftlab_base and peftlab_full_base (the two run by the peftlab of another checkout,
--base-tree: a change and its parent side by side); peftlab_heap and peftlab_full_heap (the
two with glibc serving blocks under 256 MiB from its heap, so full fine-tuning's
word-embedding gradient is not mapped and zeroed afresh at every step); and the Trainer ways
strong / tuned / seeds.

Usage: PEFTLAB_DATA=../shared/data python benchmarks/vs_trainer.py \\
           [--recipe recipes/minilm_sst2_lora.yaml] [--steps 60] [--rounds 3] \\
           [--precisions bf16,no] [--configs peftlab,strong,tuned] [--tag vs_trainer_cpu] \\
           [--base-tree DIR]
Writes benchmarks/results/<tag>.json (every record and the ratios) and <tag>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine, planner_fingerprint
from peftlab.config import load_recipe
from peftlab.memory import MB, estimate, overhead_bytes
from peftlab.model_shape import shape_of

RESULTS = Path(__file__).parent / "results"
# the same job on both sides: no test split to evaluate, no checkpoints, no trackers
COMMON = ["data.test=null", "data.split_ratios=[0.9,0.1,0.0]", "train.eval_every_steps=0",
          "train.keep_checkpoints=0", "train.report_to=[none]"]
TIMES = ("median_step_seconds", "train_loop_seconds", "wall_seconds")
# glibc serves every block under 256 MiB from its heap and keeps up to 256 MiB of free heap
# top: full fine-tuning's 47 MB word-embedding gradient is then reused instead of mapped
# and zeroed afresh at every step
HEAP = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
PEFTLAB_ENV = {"peftlab": {}, "peftlab_mmap": {"PEFTLAB_MMAP_THRESHOLD": str(128 * 1024)},
               "peftlab_onednn1024": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"},
               "peftlab_full": {}, "peftlab_torch_sdpa": {"PEFTLAB_TORCH_ATTENTION": "1"},
               "peftlab_full_torch_sdpa": {"PEFTLAB_TORCH_ATTENTION": "1"},
               "peftlab_heap": HEAP, "peftlab_full_heap": HEAP,
               "peftlab_base": {}, "peftlab_full_base": {}}
# peftlab_full: the same job as full fine-tuning (at full fine-tuning's default lr), so the
# ratio peftlab / peftlab_full is LoRA's step against full's, interleaved like the rest
FULL = ["strategy.kind=full", "train.lr=5e-05"]
PEFTLAB_OVERRIDES = {"peftlab_full": FULL, "peftlab_full_torch_sdpa": FULL,
                     "peftlab_full_heap": FULL, "peftlab_full_base": FULL}
# ratios beside peftlab / each rival, reported when both configurations ran
PAIRS = [("peftlab_torch_sdpa", "peftlab_full_torch_sdpa"),  # LoRA/full, torch's SDPA
         ("peftlab_heap", "peftlab_full_heap"),  # LoRA/full, both on the heap
         ("peftlab_full_heap", "peftlab_full"),  # what the heap gives full
         ("peftlab_full", "peftlab_full_base"),  # the change, for full
         ("peftlab_base", "peftlab_full_base")]  # LoRA/full before the change


def overrides(args, precision: str) -> list[str]:
    return [*COMMON, f"train.max_steps={args.steps}", f"train.mixed_precision={precision}",
            *args.set]


def run_peftlab(args, precision: str, out: Path, config: str) -> dict:
    extra = [*overrides(args, precision), *PEFTLAB_OVERRIDES.get(config, [])]
    recipe = load_recipe(args.recipe, extra)
    record = {"config": config, "precision": precision,
              "predicted_peak_mb": round(estimate(
                  shape_of(recipe), recipe, recipe.strategy.kind, recipe.train.batch_size,
                  recipe.train.gradient_checkpointing, overhead_bytes(recipe, "cpu"),
                  "cpu").total / MB, 1),
              "predicted_at": time.time(), "planner": planner_fingerprint(),
              "command": " ".join(["peftlab train", args.recipe, *extra])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "record.json").write_text(json.dumps(record, indent=2))  # blind: before the run
    env = dict(os.environ, **PEFTLAB_ENV[config])
    # peftlab from this checkout, or (the *_base configs) from the --base-tree checkout
    entry = ["-m", "peftlab"]
    if config.endswith("_base"):
        entry = ["-c", (f"import sys; sys.path.insert(0, {str(args.base_tree)!r}); "
                        "from peftlab.cli import main; sys.exit(main())")]
    tick = time.perf_counter()
    subprocess.run([sys.executable, *entry, "train", args.recipe, *extra,
                    "--output-dir", str(out / "run"), "--overwrite"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((out / "run" / "summary.json").read_text())
    metrics = json.loads((out / "run" / "metrics.json").read_text())["validation"]
    record |= {"wall_seconds": round(wall, 2),
               "train_loop_seconds": round(summary["train_seconds"] - summary["eval_seconds"]
                                           - summary["checkpoint_seconds"], 2),
               "median_step_seconds": summary["median_step_seconds"],
               "peak_memory_mb": summary["peak_memory_mb"],
               "trainable_params": summary["trainable_params"],
               "steps": summary["steps"], "validation_accuracy": metrics["accuracy"]}
    return record


def run_trainer(args, precision: str, out: Path, mode: str) -> dict:
    extra = overrides(args, precision)
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).parent / "hf_trainer_baseline.py"), "--mode",
               mode, "--precision", precision, "--recipe", args.recipe, "--out",
               str(out / "trainer.json"), *extra]
    tick = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    result = json.loads((out / "trainer.json").read_text())
    return {"config": mode, "precision": precision, "wall_seconds": round(wall, 2),
            "train_loop_seconds": result["train_seconds"],
            "median_step_seconds": result["median_step_seconds"],
            "peak_memory_mb": result["peak_memory_mb"],
            "trainable_params": result["trainable_params"], "steps": result["steps"],
            "weight_decay": result["weight_decay"], "lr": result["lr"],
            "validation_accuracy": result["validation_accuracy"],
            "command": " ".join(["python benchmarks/hf_trainer_baseline.py", "--mode", mode,
                                 "--precision", precision, "--recipe", args.recipe, *extra])}


def run_one(args, config: str, precision: str, round_index: int) -> dict:
    out = Path("runs/bench") / args.tag / f"r{round_index}_{precision}_{config}"
    if config in PEFTLAB_ENV:
        record = run_peftlab(args, precision, out, config)
    else:
        record = run_trainer(args, precision, out, config)
    return record | {"round": round_index}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "rounds": [round(v, 3) for v in values]}


def ratios(records: list[dict], config: str, rival: str, precision: str) -> dict:
    """peftlab / rival per round (below 1: peftlab faster or leaner), then median and range."""
    by_round = {}
    for r in records:
        if r["precision"] == precision and r["config"] in (config, rival):
            by_round.setdefault(r["round"], {})[r["config"]] = r
    pairs = [pair for pair in by_round.values() if len(pair) == 2]
    return {key: spread([pair[config][key] / pair[rival][key] for pair in pairs])
            for key in (*TIMES, "peak_memory_mb")}


def markdown(records: list[dict], summary: dict) -> str:
    lines = [("| precision | config | median step | train loop | wall | peak RSS | planner | "
              "val. acc. |"), "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in records:
        groups.setdefault((r["precision"], r["config"]), []).append(r)
    for (precision, config), rows in sorted(groups.items()):
        def cell(key, unit, rows=rows):
            values = [row[key] for row in rows]
            return f"{statistics.median(values):{unit}} ({min(values):{unit}}-{max(values):{unit}})"
        planner = [row["predicted_peak_mb"] for row in rows if "predicted_peak_mb" in row]
        peak = statistics.median(row["peak_memory_mb"] for row in rows)
        lines.append(
            f"| {precision} | {config} | {cell('median_step_seconds', '.3f')} s | "
            f"{cell('train_loop_seconds', '.1f')} s | {cell('wall_seconds', '.1f')} s | "
            f"{cell('peak_memory_mb', ',.0f')} MB | "
            + (f"{planner[0]:,.0f} MB ({(planner[0] / peak - 1) * 100:+.0f}%)" if planner
               else "") + f" | {statistics.median(r['validation_accuracy'] for r in rows):.4f} |")
    lines += ["", "| precision | ratio | median step | train loop | wall | peak RSS |",
              "|---|---|---|---|---|---|"]
    for key, values in summary.items():
        precision, config, rival = key.split(":")
        cells = [f"{v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})"
                 for v in (values[k] for k in (*TIMES, "peak_memory_mb"))]
        lines.append(f"| {precision} | {config} / {rival} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/minilm_sst2_lora.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,no")
    parser.add_argument("--configs", default="peftlab,strong,tuned")
    parser.add_argument("--tag", default="vs_trainer_cpu")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--base-tree", type=Path,
                        help="another checkout (git worktree add DIR COMMIT): the configs "
                             "peftlab_base and peftlab_full_base run its peftlab, for an A/B "
                             "of a change in one invocation")
    args = parser.parse_args()
    configs = args.configs.split(",")
    base_commit = None
    if args.base_tree:
        args.base_tree = args.base_tree.resolve()
        base_commit = subprocess.run(["git", "-C", str(args.base_tree), "rev-parse", "HEAD"],
                                     capture_output=True, text=True, check=True).stdout.strip()
    elif any(config.endswith("_base") for config in configs):
        parser.error("the *_base configurations need --base-tree")
    records = []
    for round_index in range(args.rounds):
        for precision in args.precisions.split(","):
            shift = round_index % len(configs)
            for config in configs[shift:] + configs[:shift]:  # rotated: no fixed position
                records.append(run_one(args, config, precision, round_index))
                print(json.dumps(records[-1]), flush=True)
    pairs = [("peftlab", rival) for rival in configs if rival != "peftlab"]
    pairs += [pair for pair in PAIRS if set(pair) <= set(configs)]
    summary = {f"{precision}:{config}:{rival}": ratios(records, config, rival, precision)
               for precision in args.precisions.split(",") for config, rival in pairs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"command": " ".join(["python benchmarks/vs_trainer.py", *sys.argv[1:]]),
         "machine": machine(), "base_commit": base_commit, "ratios": summary,
         "records": records}, indent=2))
    table = markdown(records, summary)
    (RESULTS / f"{args.tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
