"""Turn one finished run folder into benchmarks/results/<name>.json (what, how, measured).

Usage: python benchmarks/collect_run.py RUN_DIR NAME RECIPE [OVERRIDES...]
"""

import json
import os
import platform
import sys
from pathlib import Path

import accelerate
import peft
import torch
import transformers


def main() -> None:
    run_dir, name, recipe, *overrides = sys.argv[1:]
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    keys = ("accuracy", "f1_macro", "loss")
    record = {
        "recipe": recipe,
        "command": " ".join(["PEFTLAB_DATA=../shared/data peftlab train", recipe, *overrides]),
        "summary": summary,
        "validation": {k: metrics["validation"][k] for k in keys},
        "test": {k: metrics["test"][k] for k in keys},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "peft": peft.__version__,
                    "accelerate": accelerate.__version__},
    }
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"{name}: dev accuracy {record['validation']['accuracy']:.4f}, test accuracy "
          f"{record['test']['accuracy']:.4f}, {summary['train_seconds']:.0f}s, "
          f"{summary['peak_memory_mb']:.0f} MB peak")


if __name__ == "__main__":
    main()
