"""Causal-LM supervised fine-tuning as a Task: completion-only loss, perplexity, samples.

The loss of a step is the sum of target-token cross-entropies divided by the target tokens of
the whole step (all micro-batches, all processes), so long and short examples weigh by their
tokens and the result does not depend on how a batch is split.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from peftlab.artifacts import load_artifact, save_artifact
from peftlab.batches import make_loader
from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.hardware import precision_context
from peftlab.lm_loss import logits_bytes, token_losses
from peftlab.models import load_pretrained, load_tokenizer, resolve_model_path
from peftlab.strategies import PEFT_KINDS, apply_strategy
from peftlab.task import Task
from peftlab.tasks.sft_data import IGNORE, collate_sft, load_sft_data

METRICS = ("loss", "perplexity")  # train.metric_for_best
NEW_HEAD = False  # lm_head is pretrained: it stays frozen under adapters
PIPELINE_TAG = "text-generation"  # the hub's pipeline and model-index task type
AUTO_CLASS = "AutoModelForCausalLM"  # what plain transformers loads it with
CARD_METRICS = ("perplexity", "loss")  # metrics.json keys that go in the card's model-index
PREDICT_OPTIONS = (
    (("--prompt",), {"action": "append", "help": "causal-LM runs: a prompt to continue "
                                                 "(repeatable)"}),
    (("--max-new-tokens",), {"type": int, "default": 128, "help": "generation length"}),
    (("--temperature",), {"type": float, "default": 0.0, "help": "0 = greedy"}),
)


def summed_token_loss(model: nn.Module, batch: dict, chunked: bool = True,
                      chunk: int = 0) -> torch.Tensor:
    return token_losses(model, batch, chunked, chunk)[0].sum()


def count_target_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE).sum()


@torch.inference_mode()
def evaluate_lm(model, loader, accelerator, final: bool = False, chunked: bool = True,
                chunk: int = 0) -> dict:
    """Token-weighted loss and perplexity over a split, every example counted once; the
    logits go chunk by chunk here too, so an evaluation batch never holds them whole."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in loader:
        sums, counts = accelerator.gather_for_metrics(token_losses(model, batch, chunked,
                                                                   chunk))
        total_loss += float(sums.sum())
        total_tokens += int(counts.sum())
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "target_tokens": total_tokens}


def load_causal_lm(path: str, recipe: Recipe) -> nn.Module:
    return load_pretrained(AutoModelForCausalLM, path, recipe)


def prompt_text(tokenizer, example, fmt: str) -> str:
    """What the model sees before it answers: the chat prompt, or the raw prompt."""
    if fmt in ("prompt_completion", "text"):
        return example[0]
    turns = example[:-1] if example and example[-1]["role"] == "assistant" else example
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, tokens) ids of a rendered prompt, with BOS first as in training."""
    add_bos = bool(tokenizer.bos_token) and not prompt.startswith(tokenizer.bos_token)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if add_bos:
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    return ids


@torch.no_grad()
def generate_ids(model, tokenizer, ids: torch.Tensor, max_new_tokens: int,
                 temperature: float = 0.0, **options) -> list[int]:
    """The new token ids: greedy at temperature 0, else sampled; stops at EOS. `options`
    go to model.generate (top_p, streamer, stop_strings with tokenizer)."""
    ids = ids.to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
        "do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sampling, **options)
    return out[0, ids.shape[1]:].tolist()


def generate(model, tokenizer, prompt: str, max_new_tokens: int,
             temperature: float = 0.0) -> str:
    """Greedy by default; stops at EOS. Returns only the new text."""
    new = generate_ids(model, tokenizer, prompt_ids(tokenizer, prompt), max_new_tokens,
                       temperature)
    return tokenizer.decode(new, skip_special_tokens=True)


def prepare(recipe: Recipe, say) -> Task:
    path = resolve_model_path(recipe.model.name, recipe)
    tokenizer = load_tokenizer(path, recipe)
    data = load_sft_data(recipe, tokenizer)
    for split, info in data.report.items():
        say(f"{split}: {info['rows']} rows, {info['kept']} with target tokens "
            f"({data.fmt} format)")
    model = load_causal_lm(path, recipe)
    report = apply_strategy(model, recipe)
    say(f"strategy {recipe.strategy.kind}: {report.describe()}")
    collate = collate_sft(tokenizer.pad_token_id)
    loaders = {split: make_loader(
        ds, recipe.train.batch_size if split == "train" else recipe.eval.batch_size,
        collate=collate, train=split == "train", seed=recipe.train.seed,
        group_by_length=recipe.train.group_by_length)
        for split, ds in data.splits.items()}
    prompts = [str(p) for p in recipe.eval.sample_prompts] or [
        prompt_text(tokenizer, example, data.fmt) for example in data.prompts]

    def write_samples(model, accelerator, step: int, run_dir: Path) -> None:
        if not accelerator.is_main_process or not prompts:
            return
        unwrapped = accelerator.unwrap_model(model)
        with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as handle:
            for prompt in prompts:
                text = generate(unwrapped, tokenizer, prompt, recipe.eval.max_new_tokens)
                handle.write(json.dumps({"step": step, "prompt": prompt, "generation": text})
                             + "\n")

    def save(unwrapped: nn.Module, run_dir: Path, precision: str) -> None:
        save_artifact(unwrapped, tokenizer, run_dir, recipe.strategy.kind in PEFT_KINDS,
                      {"task": "causal_lm", "sft_format": data.fmt, "base_model": path,
                       "precision": precision})

    loss_path = {"chunked": recipe.train.chunked_lm_loss,
                 "chunk": recipe.train.lm_loss_chunk_tokens}
    return Task(report=report, loaders=loaders,
                batch_loss=partial(summed_token_loss, **loss_path),
                count_items=count_target_tokens,
                evaluate=partial(evaluate_lm, **loss_path), save=save, default_metric="loss",
                history_keys=("loss", "perplexity"), summary={"sft_format": data.fmt},
                on_evaluate=write_samples)


def load(folder: Path, recipe: Recipe, info: dict, dequantize: bool):
    return load_artifact(folder, recipe, info, dequantize,
                         lambda path: load_causal_lm(path, recipe))


def eval_loaders(recipe: Recipe, tokenizer, info: dict, data_file: str | None):
    if data_file:  # the run's row format and lengths, another file, scored whole
        recipe.data.train = recipe.data.validation = str(Path(data_file).resolve())
        recipe.data.test, recipe.data.split_ratios = None, [1.0, 0.0, 0.0]
    data = load_sft_data(recipe, tokenizer)
    collate = collate_sft(tokenizer.pad_token_id)
    splits = ["validation"] if data_file else [s for s in data.splits if s != "train"]
    loaders = {("eval" if data_file else split): make_loader(
        data.splits[split], recipe.eval.batch_size, collate=collate, train=False, seed=0)
        for split in splits}
    return loaders, evaluate_lm


def predict(args, run_dir: Path, info: dict) -> None:
    """Each prompt rendered as the run's training prompts were, then greedy (or sampled,
    with --temperature) generation until EOS."""
    from peftlab.artifacts import load_trained
    if not args.prompt:
        raise PeftlabError(f"{run_dir}: a causal-LM run; use --prompt \"...\"")
    model, tokenizer, _, info = load_trained(run_dir)
    chat = info.get("sft_format") in ("alpaca", "chat")
    for prompt in args.prompt:
        shown = prompt_text(tokenizer, [{"role": "user", "content": prompt}] if chat else
                            (prompt, ""), "chat" if chat else "text")
        with precision_context(info["precision"], next(model.parameters()).device):
            print(generate(model, tokenizer, shown, args.max_new_tokens, args.temperature))


def meta_model(config, recipe: Recipe) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_census(config, recipe: Recipe) -> None:
    return None  # the planner's closed-form transformer terms size it (memory.py)


def output_bytes(recipe: Recipe, tokens: int, vocab: int, training: bool) -> float:
    """One chunk of logits over the vocabulary (the whole when the loss is not chunked)."""
    return logits_bytes(tokens, vocab, recipe.train.chunked_lm_loss,
                        recipe.train.lm_loss_chunk_tokens, training=training)


def frozen_cache_bytes(recipe: Recipe, kind: str, hidden: int, precision: str) -> float:
    return 0.0  # no frozen-feature cache for this task (train.cache_frozen: true is refused)


def serve_routes(app, served, auth) -> None:
    from peftlab.tasks.causal_lm_serve import add_routes
    add_routes(app, served, auth)
