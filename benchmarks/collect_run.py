"""Turn one finished run folder into benchmarks/results/<name>.json (what, how, measured).

Usage: python benchmarks/collect_run.py RUN_DIR NAME RECIPE [OVERRIDES...]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine


def main() -> None:
    run_dir, name, recipe, *overrides = sys.argv[1:]
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    keys = [k for k in ("accuracy", "f1_macro", "loss", "perplexity")
            if k in metrics["validation"]]
    record = {
        "recipe": recipe,
        "command": " ".join(["PEFTLAB_DATA=../shared/data peftlab train", recipe, *overrides]),
        "summary": summary,
        "validation": {k: metrics["validation"][k] for k in keys},
        "test": {k: metrics["test"][k] for k in keys},
        "machine": machine(),
    }
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"{name}: validation {record['validation']}, test {record['test']}, "
          f"{summary['train_seconds']:.0f}s, {summary['peak_memory_mb']:.0f} MB peak")


if __name__ == "__main__":
    main()
