"""The README's first command, timed: `peftlab quickstart` from process start to exit.

Usage: python benchmarks/quickstart.py [--tag quickstart_cpu]
       (writes benchmarks/results/<tag>.json)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="quickstart_cpu", help="name of the result file")
    args = parser.parse_args()
    out = Path("runs/bench/quickstart")
    command = ["peftlab", "quickstart", "--output-dir", str(out), "--overwrite"]
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftlab", *command[1:]], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    record = {"command": " ".join(command), "wall_seconds": round(wall, 1),
              "train_seconds": summary["train_seconds"], "steps": summary["steps"],
              "precision": summary["precision"], "peak_memory_mb": summary["peak_memory_mb"],
              "validation_accuracy": metrics["validation"]["accuracy"],
              "test_accuracy": metrics["test"]["accuracy"],
              "validation_examples": metrics["validation"]["examples"],
              "test_examples": metrics["test"]["examples"], "machine": machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
