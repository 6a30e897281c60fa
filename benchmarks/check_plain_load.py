"""Prove an adapter run folder needs nothing of peftlab: load it with transformers + peft only
and compare labels with `peftlab predict` on the same texts.

Usage: python benchmarks/check_plain_load.py RUN_DIR TEXTS_FILE   (one text per line)
Prints how many labels agree; exits 1 on any disagreement.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main() -> int:
    run_dir, texts_file = Path(sys.argv[1]), sys.argv[2]
    texts = [t for t in Path(texts_file).read_text().splitlines() if t.strip()]
    info = json.loads((run_dir / "peftlab.json").read_text())  # base path and label names
    names = info["label_names"]
    base = AutoModelForSequenceClassification.from_pretrained(info["base_model"],
                                                              num_labels=len(names))
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        plain = [names[i] for i in model(**batch).logits.argmax(-1).tolist()]
    args = [x for t in texts for x in ("--text", t)]
    out = subprocess.run(["peftlab", "predict", str(run_dir), *args], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    ours = [line.split("\t")[0] for line in out]
    agree = sum(a == b for a, b in zip(plain, ours))
    print(f"plain transformers + peft vs peftlab predict: {agree}/{len(texts)} labels agree")
    return 0 if agree == len(texts) == len(ours) else 1


if __name__ == "__main__":
    raise SystemExit(main())
