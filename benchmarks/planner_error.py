"""The planner on jobs it was not fitted to: each prediction is written before its run starts.

The planner's calibrated terms (peftlab/memory.py: SST2_FITTED_*, MINILM_FITTED_*) were
fitted on SST-2 with all-MiniLM-L6-v2. Here it predicts, blind, the peak of runs on other
data and another architecture, then each run is measured in its own process:
- AG News (4 classes, news articles: longer texts, 128 tokens), MiniLM LoRA and full;
- TREC (6 classes, short questions), MiniLM LoRA;
- stories260K (a Llama decoder from llama2.c) LoRA SFT on alpaca_demo;
- SST-2 `freeze` (4 of 6 layers) and `head` with train.cache_frozen: true, whose cached
  features (one vector per token, or per example) live in memory for the whole run;
- MNIST with the small ViT and ResNet recipes at large batches (the census's jobs).
Each in fp32 and bf16 (bf16 emulated, slower but the same memory, on a CPU without it).

Usage: PEFTLAB_DATA=../shared/data python benchmarks/planner_error.py [--steps 100]
       [--jobs agnews_lora,agnews_full,trec_lora,stories_lora,freeze_cached,head_cached]
       (--jobs images: the five image jobs, vit_full_b256 ... resnet_dora_b512)
       [--precisions no,bf16] [--tag planner_error_cpu]
Writes benchmarks/results/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine, planner_fingerprint
from peftlab.config import load_recipe
from peftlab.memory import MB, plan

RESULTS = Path(__file__).parent / "results"
AGNEWS = ["data.train=ag_news/train.csv", "data.text_column=text", "data.validation=ag_news/dev.csv", "data.test=null",
          "data.split_ratios=[0.9,0.1,0.0]", "data.label_names=[world,sports,business,sci_tech]",
          "model.max_length=128", "data.max_eval_samples=500"]
JOBS = {
    "agnews_lora": ("recipes/minilm_sst2_lora.yaml", AGNEWS),
    "agnews_full": ("recipes/minilm_sst2_full.yaml", AGNEWS),
    "trec_lora": ("recipes/minilm_trec6_lora.yaml", ["data.test=null",
                                                     "data.split_ratios=[0.9,0.1,0.0]"]),
    "stories_lora": ("recipes/stories260k_alpaca_lora.yaml", ["train.eval_at_start=false",
                                                              "eval.max_new_tokens=8"]),
    "freeze_cached": ("recipes/minilm_sst2_freeze.yaml", ["strategy.freeze_layers=4",
                                                           "train.cache_frozen=true"]),
    "head_cached": ("recipes/minilm_sst2_head.yaml", ["train.cache_frozen=true"]),
    # image classifiers, sized by the census (peftlab/census.py) at batches where the
    # activations are a large part of the peak
    "vit_full_b256": ("recipes/vit_mnist_full.yaml", ["train.batch_size=256"]),
    "vit_lora_b256": ("recipes/vit_mnist_full.yaml", ["train.batch_size=256",
                                                      "strategy.kind=lora"]),
    "vit_head_b256": ("recipes/vit_mnist_full.yaml", ["train.batch_size=256",
                                                      "strategy.kind=head"]),
    "resnet_full_b1024": ("recipes/resnet_mnist_full.yaml", ["train.batch_size=1024"]),
    "resnet_dora_b512": ("recipes/resnet_mnist_full.yaml", ["train.batch_size=512",
                                                            "strategy.kind=dora"]),
}
IMAGE_JOBS = [name for name in JOBS if name.startswith(("vit_", "resnet_"))]
COMMON = ["train.keep_checkpoints=0", "train.report_to=[none]"]


def run_job(name: str, precision: str, args) -> dict:
    recipe_path, extra = JOBS[name]
    extra = [*extra, *COMMON, f"train.max_steps={args.steps}",
             f"train.eval_every_steps={args.steps // 2}", f"train.mixed_precision={precision}"]
    recipe = load_recipe(recipe_path, extra)
    guess = plan(recipe, "cpu", [recipe.strategy.kind])[0]
    out = Path("runs/bench/planner_error") / f"{name}_{precision}"
    out.mkdir(parents=True, exist_ok=True)
    record = {"job": name, "precision": precision, "predicted_peak_mb": round(guess.total / MB, 1),
              "predicted_cache_mb": round(guess.cache / MB, 1),
              "predicted_at": time.time(), "planner": planner_fingerprint(),
              "command": " ".join(["peftlab train", recipe_path, *extra])}
    (out / "prediction.json").write_text(json.dumps(record, indent=2))  # before the run
    subprocess.run([sys.executable, "-m", "peftlab", "train", recipe_path, *extra,
                    "--output-dir", str(out / "run"), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "run" / "summary.json").read_text())
    measured = summary["peak_memory_mb"]
    return record | {"peak_memory_mb": measured, "steps": summary["steps"],
                     "error": round(record["predicted_peak_mb"] / measured - 1, 4),
                     "median_step_seconds": summary["median_step_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--jobs", default=",".join(n for n in JOBS if n not in IMAGE_JOBS),
                        help="comma list; 'images' names every image job")
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--tag", default="planner_error_cpu")
    args = parser.parse_args()
    records = []
    jobs = IMAGE_JOBS if args.jobs == "images" else args.jobs.split(",")
    for name in jobs:
        for precision in args.precisions.split(","):
            records.append(run_job(name, precision, args))
            print(json.dumps(records[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"command": " ".join(["python benchmarks/planner_error.py", *sys.argv[1:]]),
         "machine": machine(), "records": records}, indent=2))
    lines = ["| job | precision | predicted (blind) | measured peak RSS | error |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['job']} | {r['precision']} | {r['predicted_peak_mb']:,.0f} MB | "
              f"{r['peak_memory_mb']:,.0f} MB | {r['error'] * 100:+.1f}% |" for r in records]
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
