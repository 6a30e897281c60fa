"""Export a finished run: merge an adapter into its base for plain transformers.

A run trained on a 4-bit or 8-bit base merges into a dequantized fp32 copy of that base (the
weights the adapter actually trained against), never into the quantized weights: merging
there re-quantizes the sum and is known upstream to corrupt outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftlab.artifacts import load_trained, read_run
from peftlab.errors import PeftlabError
from peftlab.run_folder import MERGE_MARKER


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write `out_dir`: the base with the adapter merged in, plus the tokenizer."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _, info = read_run(run_dir)
    if info["artifact"] != "adapter":
        raise PeftlabError(f"{run_dir}: not an adapter run; its model/ folder is already a "
                           f"full model")
    if info.get("pooling") == "mean":
        raise PeftlabError(f"{run_dir}: a mean-pooled head has no transformers class to merge "
                           f"into; load it with peftlab instead")
    model, tokenizer, _, _ = load_trained(run_dir, dequantize=True)
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MERGE_MARKER).write_text(json.dumps(
        {"run": str(run_dir.resolve()), "base_model": info["base_model"], "dtype": dtype},
        indent=2), encoding="utf-8")
    return out_dir
