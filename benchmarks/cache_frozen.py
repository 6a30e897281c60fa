"""Cached frozen features against the plain loop: SST-2 / MiniLM, `head` and `freeze`.

Each job is a real `peftlab train` of the shipped recipe in its own process, with the same
settings but train.cache_frozen; pairs run back to back (off, on) so the machine's mood hits
both alike. The targets (issue 11):
- head, 3 epochs: cached >= 2.5x faster than uncached at equal dev accuracy (+-0.5 point),
  and faster than one uncached epoch;
- freeze 4 of 6 layers, 3 epochs: cached steps >= 1.5x faster, 3-epoch total >= 1.3x faster.
Time is the run's train_seconds (the loop with its evaluations) plus, when cached, its
cache_seconds (the one pass of the frozen layers over every split, before the loop); both
come from the run's summary.json, and the wall time of the whole command is kept too.

Usage: PEFTLAB_DATA=../shared/data python benchmarks/cache_frozen.py [--epochs 3]
       [--jobs head,freeze] [--precision auto]
Writes benchmarks/results/cache_frozen_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine

RESULTS = Path(__file__).parent / "results"
WORK = Path("runs/bench/cache_frozen")
JOBS = {
    "head": ("recipes/minilm_sst2_head.yaml", []),
    "freeze": ("recipes/minilm_sst2_freeze.yaml", ["strategy.freeze_layers=4"]),
}
COMMON = ["train.keep_checkpoints=0", "train.report_to=[none]", "train.eval_every_steps=0"]


def run_job(name: str, epochs: float, cache: bool, precision: str) -> dict:
    recipe, extra = JOBS[name]
    extra = [*extra, *COMMON, f"train.epochs={epochs:g}", f"train.cache_frozen={str(cache).lower()}",
             f"train.mixed_precision={precision}"]
    out = WORK / f"{name}_{epochs:g}ep_{'cached' if cache else 'plain'}"
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftlab", "train", recipe, *extra, "--output-dir",
                    str(out), "--overwrite"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {"job": name, "epochs": epochs, "cache_frozen": cache,
            "cached": summary.get("cache_frozen"), "precision": summary["precision"],
            "wall_seconds": round(wall, 1), "train_seconds": summary["train_seconds"],
            "cache_seconds": summary.get("cache_seconds"),
            "median_step_seconds": summary["median_step_seconds"],
            "peak_memory_mb": summary["peak_memory_mb"],
            "validation_accuracy": metrics["validation"]["accuracy"],
            "test_accuracy": metrics["test"]["accuracy"],
            "command": " ".join(["peftlab train", recipe, *extra])}


def table(records: list[dict]) -> str:
    lines = [("| job | epochs | cache | wall | frozen pass | training | median step | peak RSS "
             "| dev acc. | test acc. |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['job']} | {r['epochs']:g} | {'on' if r['cached'] else 'off'} | "
            f"{r['wall_seconds']:.0f} s | {r['cache_seconds'] or 0:.0f} s | "
            f"{r['train_seconds']:.0f} s | {r['median_step_seconds'] * 1000:.1f} ms | "
            f"{r['peak_memory_mb']:,.0f} MB | {r['validation_accuracy'] * 100:.2f}% | "
            f"{r['test_accuracy'] * 100:.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    records = []
    for name in args.jobs.split(","):
        for cache in (False, True):
            records.append(run_job(name, args.epochs, cache, args.precision))
            print(json.dumps(records[-1]), flush=True)
        if name == "head":  # the bar the cached 3 epochs must beat: one uncached epoch
            records.append(run_job(name, 1, False, args.precision))
            print(json.dumps(records[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "cache_frozen_cpu.json"
    command = " ".join(["python benchmarks/cache_frozen.py", *sys.argv[1:]])
    for record in records:
        record["invocation"] = command
    # the jobs not run this time keep their records (and the invocation that made them)
    ran = {r["job"] for r in records}
    kept = [r for r in json.loads(path.read_text())["records"] if r["job"] not in ran] \
        if path.exists() else []
    records = kept + records
    path.write_text(json.dumps({"machine": machine(), "records": records}, indent=2))
    (RESULTS / "cache_frozen_cpu.md").write_text(table(records))
    print(table(records))


if __name__ == "__main__":
    main()
