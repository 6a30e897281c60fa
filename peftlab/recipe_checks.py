"""Cross-field checks of a recipe that its types alone cannot express: allowed values,
minimums, the task and its metrics, and combinations that cannot train."""

from __future__ import annotations

from peftlab.config import Recipe
from peftlab.errors import PeftlabError

STRATEGY_KINDS = ("full", "head", "freeze", "gradual", "lora", "dora", "qlora", "peft")
CHOICES = {
    "model.pooling": ("auto", "cls", "mean"),
    "data.format": ("auto", "csv", "tsv", "json", "jsonl", "parquet", "disk", "hub", "prefixed",
                    "conll"),
    "strategy.kind": STRATEGY_KINDS,
    "train.scheduler": ("linear", "cosine", "constant_with_warmup"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.cache_frozen": ("auto", True, False),
    "model.quantization": ("none", "nf4", "fp4", "int8"),
    "model.compute_dtype": ("auto", "bfloat16", "float32", "float16"),
    "train.optimizer": ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    "data.sft_format": ("auto", "alpaca", "chat", "prompt_completion", "text"),
    "data.label_case": ("keep", "lower"),
    "data.bad_answers": ("error", "drop"),
    "data.bad_images": ("error", "skip"),
}

# the smallest valid value of each numeric field that has one
MINIMUMS = {"model.max_length": 1, "train.batch_size": 1, "train.grad_accum": 1,
            "eval.batch_size": 1, "strategy.lora_r": 1, "train.log_every_steps": 1,
            "strategy.freeze_layers": 0, "train.max_steps": 0, "train.save_every_steps": 0,
            "train.keep_checkpoints": 0, "train.lm_loss_chunk_tokens": 0,
            "train.eval_every_steps": 0,
            "train.early_stopping_patience": 0, "train.max_grad_norm": 0,
            "train.warmup_ratio": 0, "data.max_train_samples": 0, "data.max_eval_samples": 0,
            "data.doc_stride": 0, "data.workers": 0, "data.augment_rotation": 0,
            "eval.max_answer_length": 1, "eval.n_best": 1}


def validate(recipe: Recipe) -> None:
    """Cross-field checks that the types alone cannot express."""
    where = recipe.source
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section), key)
        if value not in allowed:
            raise PeftlabError(f"{where}: {dotted}: unknown value '{value}'; "
                               f"choose one of {', '.join(str(a).lower() for a in allowed)}")
    _validate_task(recipe)
    from peftlab.trackers import TRACKERS
    unknown = [t for t in recipe.train.report_to if t not in (*TRACKERS, "none")]
    if unknown:
        raise PeftlabError(f"{where}: train.report_to: unknown tracker '{unknown[0]}'; choose "
                           f"from {', '.join(TRACKERS)}, or none")
    if not recipe.data.train:
        raise PeftlabError(f"{where}: data.train is required (a file, folder or hub dataset)")
    ratios = recipe.data.split_ratios
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise PeftlabError(f"{where}: data.split_ratios must be 3 non-negative numbers "
                           f"summing to 1 (train, validation, test), got {ratios}")
    for dotted, minimum in MINIMUMS.items():
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section), key)
        if value is not None and value < minimum:  # None: the field is unset
            raise PeftlabError(f"{where}: {dotted} must be >= {minimum}, got {value}")
    scale = recipe.data.augment_crop_scale
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise PeftlabError(f"{where}: data.augment_crop_scale must be [low, high] with "
                           f"0 < low <= high <= 1 (shares of the image's area), got {scale}")
    if recipe.train.lr is not None and recipe.train.lr <= 0:
        raise PeftlabError(f"{where}: train.lr must be > 0, got {recipe.train.lr}")
    if recipe.train.epochs <= 0 and recipe.train.max_steps <= 0:
        raise PeftlabError(f"{where}: set train.epochs > 0 or train.max_steps > 0")
    if recipe.eval.hub_metrics and not recipe.eval.trust_hub_metrics:
        raise PeftlabError(f"{where}: eval.hub_metrics {recipe.eval.hub_metrics} downloads "
                           f"and runs Python code from the Hub; set eval.trust_hub_metrics: "
                           f"true if you trust it")
    if recipe.strategy.kind == "peft" and "peft_type" not in recipe.strategy.peft:
        raise PeftlabError(f"{where}: strategy.kind peft needs strategy.peft.peft_type "
                           f"(e.g. IA3, LOHA, VERA) and that config's fields")
    quantized, kind = recipe.model.quantization != "none", recipe.strategy.kind
    if quantized and kind in ("full", "freeze", "gradual"):
        raise PeftlabError(f"{where}: model.quantization {recipe.model.quantization} with "
                           f"strategy.kind {kind}: quantized weights cannot train; use qlora, "
                           f"lora, dora, peft or head")
    if kind == "qlora" and recipe.model.quantization == "int8":
        raise PeftlabError(f"{where}: qlora is a 4-bit base; for an 8-bit base use "
                           f"strategy.kind lora with model.quantization int8")


def _validate_task(recipe: Recipe) -> None:
    """model.task names a task module, and metric_for_best one of its metrics."""
    from peftlab.tasks import TASKS  # imported here: the tasks import this module
    task = TASKS.get(recipe.model.task)
    if task is None:
        raise PeftlabError(f"{recipe.source}: model.task: unknown value '{recipe.model.task}'; "
                           f"choose one of {', '.join(TASKS)}")
    if recipe.train.metric_for_best not in ("auto", *task.METRICS):
        raise PeftlabError(f"{recipe.source}: train.metric_for_best: unknown value "
                           f"'{recipe.train.metric_for_best}' for task {recipe.model.task}; "
                           f"choose one of auto, {', '.join(task.METRICS)}")
