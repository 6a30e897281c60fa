"""What each memory saver saves: peak memory of a few causal-LM SFT steps per setting.

Each setting trains in its own process (peak RSS on CPU, max allocated on GPU is per
process), on a random-initialised Llama whose size is set below (memory does not depend on
weight values). Results: benchmarks/results/memory_savers_<device>.json and a table.

Usage: python benchmarks/memory_savers.py [--hidden 512 --layers 8 --seq 512 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "full fp32 AdamW": {"strategy": {"kind": "full"}},
    "full + 8-bit AdamW": {"strategy": {"kind": "full"}, "train": {"optimizer": "adamw_8bit"}},
    "full + checkpointing": {"strategy": {"kind": "full"},
                             "train": {"gradient_checkpointing": True}},
    "LoRA r=16": {"strategy": {"kind": "lora", "lora_r": 16}},
    "LoRA + checkpointing": {"strategy": {"kind": "lora", "lora_r": 16},
                             "train": {"gradient_checkpointing": True}},
    "QLoRA nf4": {"strategy": {"kind": "qlora", "lora_r": 16}},
    "QLoRA nf4 + checkpointing": {"strategy": {"kind": "qlora", "lora_r": 16},
                                  "train": {"gradient_checkpointing": True}},
}


def build_model(folder: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import word_tokenizer
    tokenizer = word_tokenizer(folder, pad=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder)


def write_data(folder: Path, seq: int) -> Path:
    words = ["the", "movie", "was", "really", "quite", "good", "and", "the", "story", "of", "this", "film", "is", "a", "very", "nice", "one", "with", "music"]
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(seq))}
            for i in range(64)]
    path = folder / "text.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    import yaml
    work = Path(tempfile.mkdtemp())
    build_model(work / "model", args.hidden, args.layers)
    data = write_data(work, args.seq)
    results = []
    for name, sections in SETTINGS.items():
        recipe = {"model": {"name": str(work / "model"), "task": "causal_lm",
                            "max_length": args.seq + 2, "compute_dtype": "float32"},
                  "data": {"train": str(data), "split_ratios": [0.9, 0.1, 0.0]},
                  "train": {"max_steps": args.steps, "batch_size": args.batch,
                            "mixed_precision": "no", "report_to": ["none"],
                            **sections.get("train", {})},
                  "strategy": sections["strategy"],
                  "eval": {"sample_prompts": ["the movie"], "max_new_tokens": 1}}
        path = work / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = work / "runs" / name.replace(" ", "_").replace("/", "_")
        done = subprocess.run([sys.executable, "-m", "peftlab", "train", str(path),
                               "--output-dir", str(out)], capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
        if done.returncode:
            print(name, "failed:", done.stderr[-500:])
            continue
        summary = json.loads((out / "summary.json").read_text())
        results.append({"setting": name, "peak_memory_mb": summary["peak_memory_mb"],
                        "trainable_params": summary["trainable_params"],
                        "total_params": summary["total_params"],
                        "median_step_seconds": summary["median_step_seconds"],
                        "device": summary["device"]})
        print(f"{name:28s} peak {summary['peak_memory_mb']:8.0f} MB  "
              f"step {summary['median_step_seconds']:.2f}s", flush=True)
    device = results[0]["device"] if results else "none"
    record = {"command": "python benchmarks/memory_savers.py " + " ".join(sys.argv[1:]),
              "model": {"hidden": args.hidden, "layers": args.layers, "seq": args.seq,
                        "batch": args.batch, "params": results[0]["total_params"]
                        if results else None},
              "results": results}
    out = Path(__file__).parent / "results" / f"memory_savers_{device.split(':')[0]}.json"
    out.write_text(json.dumps(record, indent=2))
    base = results[0]["peak_memory_mb"] if results else 1
    print("\n| setting | peak memory | vs full fp32 AdamW | trainable params | median step |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['peak_memory_mb']:.0f} MB | "
              f"{r['peak_memory_mb'] / base:.2f}x | {r['trainable_params']:,} | "
              f"{r['median_step_seconds']:.2f} s |")


if __name__ == "__main__":
    main()
