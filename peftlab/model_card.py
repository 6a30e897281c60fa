"""The model card of a published run: hub metadata (with a model-index built from
metrics.json) through huggingface_hub's ModelCardData, and a body that says how the model
was made, how well it does, how to load it with plain transformers/peft, and its limits."""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.config import Recipe
from peftlab.tasks import task_module

LIBRARY = {"adapter": "peft", "merged": "transformers", "full": "transformers"}


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def dataset_name(recipe: Recipe) -> str:
    """The training data's hub id when known (output.datasets, or a hub dataset), else the
    name of its file's folder (sst2 for .../sst2/train.tsv)."""
    if recipe.output.datasets:
        return recipe.output.datasets[0]
    train = recipe.data.train
    if recipe.data.format == "hub" or (train.count("/") == 1 and not Path(train).suffix and
                                       not Path(train).exists()):
        return train
    path = Path(train)
    return path.parent.name if path.suffix else path.name


def base_license(recipe: Recipe) -> str | None:
    """output.license, else what the base model's own card (on this machine) says."""
    if recipe.output.license:
        return recipe.output.license
    from huggingface_hub import ModelCard

    from peftlab.errors import PeftlabError
    from peftlab.models import resolve_model_path
    try:
        card = Path(resolve_model_path(recipe.model.name, recipe)) / "README.md"
    except PeftlabError:
        return None
    return ModelCard.load(card).data.license if card.is_file() else None


def card_data(recipe: Recipe, metrics: dict, repo_id: str, hub_id: str, what: str):
    from huggingface_hub import EvalResult, ModelCardData
    task = task_module(recipe.model.task)
    data = dataset_name(recipe)
    results = [EvalResult(task_type=task.PIPELINE_TAG, dataset_type=data, dataset_name=data,
                          dataset_split=split, metric_type=metric,
                          metric_value=round(float(values[metric]), 4))
               for split in ("test", "validation") if isinstance(values := metrics.get(split), dict)
               for metric in task.CARD_METRICS if isinstance(values.get(metric), (int, float))]
    datasets = list(recipe.output.datasets) or ([data] if "/" in data else None)
    return ModelCardData(base_model=hub_id, library_name=LIBRARY[what],
                         pipeline_tag=task.PIPELINE_TAG, license=base_license(recipe),
                         tags=["peftlab", recipe.strategy.kind, task.PIPELINE_TAG],
                         datasets=datasets, model_name=repo_id.split("/")[-1],
                         eval_results=results or None)


def _label_kwargs(info: dict) -> str:
    names = info.get("label_names") or info.get("tag_names")
    if not names:
        return ""
    return f", num_labels={len(names)}, id2label={dict(enumerate(names))!r}"


def loading_snippet(recipe: Recipe, info: dict, repo_id: str, hub_id: str, what: str) -> str:
    """Plain transformers (+ peft's generic PeftModel, which passes token_type_ids through,
    unlike its task classes: see strategies._peft_task). The inputs' class is the task's
    (a tokenizer, or an image processor)."""
    task = task_module(recipe.model.task)
    auto, inputs = task.AUTO_CLASS, getattr(task, "INPUTS_CLASS", "AutoTokenizer")
    name = "processor" if inputs == "AutoImageProcessor" else "tokenizer"
    # a base with another head size needs ignore_mismatched_sizes (a new head for the labels)
    mismatched = ", ignore_mismatched_sizes=True" if name == "processor" else ""
    if what == "adapter":
        return (f"from peft import PeftModel\nfrom transformers import {auto}, {inputs}\n"
                f"base = {auto}.from_pretrained(\"{hub_id}\"{_label_kwargs(info)}"
                f"{mismatched})\n"
                f"model = PeftModel.from_pretrained(base, \"{repo_id}\")\n"
                f"{name} = {inputs}.from_pretrained(\"{repo_id}\")")
    return (f"from transformers import {auto}, {inputs}\n"
            f"model = {auto}.from_pretrained(\"{repo_id}\")\n"
            f"{name} = {inputs}.from_pretrained(\"{repo_id}\")")


def _results_table(metrics: dict) -> list[str]:
    rows = [(split, key, value) for split in ("validation", "test")
            if isinstance(metrics.get(split), dict)
            for key, value in metrics[split].items() if isinstance(value, (int, float))]
    if not rows:
        return ["No evaluation was recorded."]
    return ["| split | metric | value |", "|---|---|---|"] + [
        f"| {split} | {key} | {value:.4f} |" if isinstance(value, float) else
        f"| {split} | {key} | {value} |" for split, key, value in rows]


def _hyperparameters(recipe: Recipe, summary: dict) -> list[str]:
    t, s = recipe.train, recipe.strategy
    rows = {"strategy": s.kind, "learning rate": t.lr, "epochs": t.epochs,
            "max steps": t.max_steps or None, "micro-batch": t.batch_size,
            "gradient accumulation": t.grad_accum,
            "effective batch": summary.get("effective_batch"), "max length": recipe.model.max_length,
            "scheduler": t.scheduler, "warmup ratio": t.warmup_ratio,
            "weight decay": t.weight_decay, "optimizer": t.optimizer,
            "precision": summary.get("precision", t.mixed_precision), "seed": t.seed}
    if s.kind in ("lora", "dora", "qlora"):
        rows |= {"LoRA rank": s.lora_r, "LoRA alpha": s.lora_alpha,
                 "LoRA dropout": s.lora_dropout,
                 "target modules": ", ".join(s.target_modules or ["every linear layer"])}
    if s.kind == "freeze":
        rows["frozen layers"] = s.freeze_layers
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()
                                                  if v is not None]


def build_card(recipe: Recipe, info: dict, run_dir: Path, repo_id: str, hub_id: str,
               what: str) -> str:
    """README.md of the upload: metadata block + body."""
    from huggingface_hub import ModelCard
    metrics = _read_json(run_dir / "metrics.json")
    summary = _read_json(run_dir / "summary.json")
    data = card_data(recipe, metrics, repo_id, hub_id, what)
    task = task_module(recipe.model.task)
    sizes = summary.get("examples") or {}
    trainable = summary.get("trainable_params")
    total = summary.get("total_params")
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{hub_id} fine-tuned for {task.PIPELINE_TAG} on {dataset_name(recipe)} with "
        f"[peftlab](https://pypi.org/project/peftlab/), strategy `{recipe.strategy.kind}`"
        + (" (the adapter merged into the base)" if what == "merged" else "") + ".",
        "",
        "## Training",
        "",
        f"- Strategy: `{recipe.strategy.kind}`"
        + (f", {trainable:,} of {total:,} parameters trained "
           f"({summary.get('trainable_percent', 0):.2f}%)" if trainable and total else ""),
        "- Data: " + (", ".join(f"{split} {count:,} examples" for split, count in sizes.items())
                      or dataset_name(recipe)),
        (f"- Steps: {summary.get('steps', '?')}, training time "
         f"{summary.get('train_seconds', 0):.0f} s on {summary.get('device', '?')} "
         f"({_processes(summary.get('processes', 1))}), peak memory "
         f"{summary.get('peak_memory_mb', 0):,.0f} MB"),
        "",
        *_hyperparameters(recipe, summary),
        "",
        ("The full recipe is in `recipe.yaml`; `metrics.json` and `summary.json` hold every "
         "number of the run."),
        "",
        "## Results",
        "",
        *_results_table(metrics),
        "",
        "## How to use",
        "",
        "```python",
        loading_snippet(recipe, info, repo_id, hub_id, what),
        "```",
        "",
        "## Limitations",
        "",
        (f"- Inputs longer than {recipe.model.max_length} tokens were truncated in training "
         f"and evaluation."),
        (f"- It knows only what {hub_id} knew and what {dataset_name(recipe)} taught it; the "
         f"scores above hold for data like that, not beyond."),
        (f"- It inherits the base model's biases and license terms "
         f"({data.license or 'see the base model'})."),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))
