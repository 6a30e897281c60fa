"""Markdown table of benchmarks/results/<prefix>*.json, for the README.

Usage: python benchmarks/results_table.py [prefix]   (default prefix: sst2_)
"""

import json
import sys
from pathlib import Path

from report import ORDER  # the strategies benchmark's order: one list for both tables


def main() -> None:
    prefix = sys.argv[1] if len(sys.argv) > 1 else "sst2_"
    records = [json.loads(p.read_text()) for p in
               sorted((Path(__file__).parent / "results").glob(f"{prefix}*.json"))]
    records = [r for r in records if "summary" in r]  # one-epoch runs, not strategies.py
    records.sort(key=lambda r: ORDER.index(r["summary"]["strategy"])
                 if r["summary"]["strategy"] in ORDER else 99)
    print("| strategy | train rows | dev accuracy | test accuracy | trainable params | "
          "training time | median step | samples/s | peak RSS | command |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        s = r["summary"]
        rows = "20,000" if "max_train_samples=20000" in r["command"] else "67,349"
        print(f"| {s['strategy']} | {rows} | {r['validation']['accuracy'] * 100:.2f}% | "
              f"{r['test']['accuracy'] * 100:.2f}% | {s['trainable_params']:,} "
              f"({s['trainable_percent']:.2f}%) | {s['train_seconds'] / 60:.1f} min | "
              f"{s['median_step_seconds']:.2f} s | {s['samples_per_second']:.0f} | "
              f"{s['peak_memory_mb'] / 1024:.2f} GiB | `{r['command']}` |")


if __name__ == "__main__":
    main()
