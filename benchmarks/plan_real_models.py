"""`peftlab plan` rows for real architectures, next to LLaMA-Factory's static table.

The configs in benchmarks/configs/ are written from the models' published sizes (no weights
needed: the planner builds the model on the meta device). Assumptions, stated in the output:
one GPU, bf16 autocast, micro-batch 1 (eval batch too), 512 tokens, activation checkpointing
on, AdamW, LoRA r=16 on every linear layer.

Usage: python benchmarks/plan_real_models.py [--seq 512] [--batch 1] [--no-checkpointing]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peftlab.config import recipe_from_dict
from peftlab.memory import GiB, estimate
from peftlab.model_shape import shape_of

CONFIGS = Path(__file__).parent / "configs"
MODELS = {"Llama-3-8B": "llama3-8b", "Qwen2.5-7B": "qwen2.5-7b", "Qwen2.5-0.5B": "qwen2.5-0.5b"}
# LLaMA-Factory README, "Hardware Requirement" (estimated, 7B column): full AMP 120GB,
# full bf16 60GB, LoRA 16-bit 16GB, QLoRA 8-bit 10GB, QLoRA 4-bit 6GB
LLAMA_FACTORY_7B = {"full": "120 GB (AMP)", "lora": "16 GB (16-bit)", "qlora": "6 GB (4-bit)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    checkpointing = not args.no_checkpointing
    print(f"GPU, bf16 autocast, micro-batch {args.batch} x {args.seq} tokens, checkpointing "
          f"{'on' if checkpointing else 'off'}, AdamW; peftlab keeps trainable and "
          f"non-quantized weights in fp32")
    print("| model | params | full | lora | qlora (nf4) | LLaMA-Factory 7B |")
    print("|---|---|---|---|---|---|")
    for name, folder in MODELS.items():
        recipe = recipe_from_dict({
            "model": {"name": str(CONFIGS / folder), "task": "causal_lm",
                      "max_length": args.seq},
            "data": {"train": "x.json"}, "strategy": {"kind": "lora", "lora_r": 16},
            "train": {"batch_size": args.batch, "gradient_checkpointing": checkpointing},
            "eval": {"batch_size": args.batch}})
        shape = shape_of(recipe)
        cells = [f"{estimate(shape, recipe, k, args.batch, checkpointing, 0.0, 'cuda').total / GiB:.1f}"
                 " GiB" for k in ("full", "lora", "qlora")]
        theirs = " / ".join(LLAMA_FACTORY_7B.values()) if "7B" in name else ""
        print(f"| {name} | {shape.total / 1e9:.2f} B | " + " | ".join(cells) + f" | {theirs} |")


if __name__ == "__main__":
    main()
