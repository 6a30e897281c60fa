"""Peak memory of causal-LM training with the chunked loss against the plain logits.

The model is the Qwen2.5-0.5B architecture (benchmarks/configs/qwen2.5-0.5b: 24 layers,
hidden 896, a 151,936-word vocabulary, tied embeddings), randomly initialised: memory does
not depend on what the weights hold. Its tokenizer is a word-level one of the same vocabulary
size, and each data row is plain text of `seq` tokens, so every position is a target. Each job
is a real `peftlab train` run of recipes/qwen2.5-0.5b_alpaca_lora.yaml on that model (LoRA
r=16 on every linear layer, bf16, checkpointing off; four optimizer steps of one row each,
then an evaluation of one validation row) in its own process, the planner's prediction
for it written before it starts. Jobs run interleaved: each round runs every (seq, loss) once.
Four steps, not one: glibc's heap slack builds over the first steps (at 2,048 tokens chunked,
one step peaked at 5.9 GB, four at 6.95 GB, eight at 7.0 GB), and a real run is past them.

Usage: python benchmarks/lm_loss_memory.py [--seqs 1024,2048] [--rounds 1]
       [--precision bf16]
Writes benchmarks/results/lm_loss_memory_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine, planner_fingerprint
from peftlab.config import load_recipe
from peftlab.lm_loss import logits_bytes
from peftlab.memory import MB, estimate, overhead_bytes
from peftlab.model_shape import shape_of

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WORK = Path("runs/bench/lm_loss_memory")
CONFIG = HERE / "configs" / "qwen2.5-0.5b" / "config.json"


def build_model(folder: Path) -> Path:
    """Random Qwen2.5-0.5B weights and a byte-level BPE tokenizer of its vocabulary size with
    no merges (transformers rebuilds any tokenizer of a qwen2 folder as Qwen2's byte-level
    BPE, so the test tokenizer has to be one): each character of the data is one token."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    config = AutoConfig.from_pretrained(CONFIG.parent)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    while len(vocab) < config.eos_token_id:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    vocab["<|endoftext|>"] = config.eos_token_id
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(folder: Path, seq: int) -> Path:
    """Rows of `seq` - 1 random letters: seq tokens with the EOS, all of them targets."""
    rng = random.Random(seq)
    path = folder / f"text_{seq}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(4):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(seq - 1))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


RECIPE = "recipes/qwen2.5-0.5b_alpaca_lora.yaml"  # the shipped recipe, on the random model


def overrides(model: Path, data: Path, seq: int, chunked: bool, precision: str) -> list[str]:
    return [f"model.name={model.resolve()}", f"model.max_length={seq + 8}", f"data.train={data.resolve()}", "data.sft_format=text",
            "data.validation=null", "data.test=null", "data.split_ratios=[0.5,0.5,0.0]",
            "train.batch_size=1", "train.grad_accum=1", "train.gradient_checkpointing=false",
            "train.max_steps=4", "train.epochs=4", "train.group_by_length=false", "eval.batch_size=1",
            "eval.max_new_tokens=1", "eval.sample_prompts=[w5]", "data.max_eval_samples=1",
            f"train.mixed_precision={precision}", f"train.chunked_lm_loss={str(chunked).lower()}",
            "train.keep_checkpoints=0", "train.report_to=[none]"]


def run_job(model: Path, data: Path, seq: int, chunked: bool, precision: str) -> dict:
    extra = overrides(model, data, seq, chunked, precision)
    recipe_path = RECIPE
    recipe = load_recipe(recipe_path, extra)
    shape = shape_of(recipe)
    guess = estimate(shape, recipe, "lora", 1, False, overhead_bytes(recipe, "cpu"), "cpu")
    name = f"seq{seq}_{'chunked' if chunked else 'plain'}"
    out = WORK / name
    out.mkdir(parents=True, exist_ok=True)
    record = {"job": name, "seq": seq, "chunked": chunked, "precision": precision,
              "predicted_peak_mb": round(guess.total / MB, 1), "predicted_at": time.time(),
              "planner": planner_fingerprint(),
              "logits_term_mb": round(logits_bytes(seq, shape.vocab, chunked=False) / MB, 1),
              "command": " ".join(["peftlab train", recipe_path, *extra])}
    (out / "prediction.json").write_text(json.dumps(record, indent=2))  # before the run
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftlab", "train", recipe_path, *extra,
                    "--output-dir", str(out / "run"), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "run" / "summary.json").read_text())
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    measured = summary["peak_memory_mb"]
    return record | {"peak_memory_mb": measured, "wall_seconds": round(
        time.perf_counter() - started, 1), "train_seconds": summary["train_seconds"],
        "validation_loss": metrics["validation"]["loss"],
        "error": round(record["predicted_peak_mb"] / measured - 1, 4)}


def table(records: list[dict]) -> str:
    """Medians over rounds with (min-max); the planner's error against each round's peak;
    the saving per round (the i-th plain run of a length against its i-th chunked run)."""
    lines = [("| seq | loss | peak RSS | planner (blind) | error per round | logits term (plain) "
              "| saved vs plain | share of the logits term | validation loss |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for seq in sorted({r["seq"] for r in records}):
        runs = {c: [r for r in records if r["seq"] == seq and r["chunked"] == c]
                for c in (False, True)}
        term = runs[False][0]["logits_term_mb"]
        saved = [plain["peak_memory_mb"] - chunked["peak_memory_mb"]
                 for plain, chunked in zip(runs[False], runs[True])]
        for chunked in (False, True):
            mine = runs[chunked]
            peaks = [r["peak_memory_mb"] for r in mine]
            errors = [r["error"] * 100 for r in mine]
            saving = (f"{statistics.median(saved):,.0f} MB | "
                      f"{statistics.median(saved) / term * 100:.0f}% "
                      f"({min(saved) / term * 100:.0f}-{max(saved) / term * 100:.0f}%)"
                      if chunked else " | ")
            lines.append(
                f"| {seq} | {'chunked' if chunked else 'plain'} | "
                f"{statistics.median(peaks):,.0f} ({min(peaks):,.0f}-{max(peaks):,.0f}) MB | "
                f"{mine[0]['predicted_peak_mb']:,.0f} MB | "
                f"{min(errors):+.1f}% to {max(errors):+.1f}% | {term:,.0f} MB | {saving} | "
                f"{mine[0]['validation_loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,2048")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    model = build_model(WORK / "qwen2.5-0.5b-random")
    records = []
    for _ in range(args.rounds):
        for seq in (int(s) for s in args.seqs.split(",")):
            data = write_data(WORK, seq)
            for chunked in (False, True):
                records.append(run_job(model, data, seq, chunked, args.precision))
                print(json.dumps(records[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_loss_memory_cpu.json").write_text(json.dumps(
        {"command": " ".join(["python benchmarks/lm_loss_memory.py", *sys.argv[1:]]),
         "machine": machine(), "records": records}, indent=2))
    (RESULTS / "lm_loss_memory_cpu.md").write_text(table(records))
    print(table(records))


if __name__ == "__main__":
    main()
