"""The run folder's model, loaded back for eval, predict and merge, through its task.

Layout: `adapter/` (peft kinds; loadable by plain `PeftModel.from_pretrained(base, path)`)
or `model/` (full safetensors), each with the tokenizer; `peftlab.json` says which, the task,
and the task's own facts (labels, pooling, chat format). Each task writes and reads its
artifact (peftlab/tasks/); this module holds what they share.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from peftlab.config import Recipe, load_recipe
from peftlab.errors import PeftlabError
from peftlab.fused_lora import use_fused_lora
from peftlab.models import load_tokenizer, resolve_model_path
from peftlab.quantization import dequantize_linears, quantization_kind

INFO_FILE = "peftlab.json"


def save_artifact(model, tokenizer, run_dir: Path, peft: bool, info: dict) -> Path:
    """The trained model (`model/`) or adapter (`adapter/`) with its tokenizer, and
    peftlab.json with `info` (the task and its facts); returns the folder."""
    folder = run_dir / ("adapter" if peft else "model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_info(run_dir, {"artifact": folder.name, **info})
    return folder


def write_info(run_dir: Path, info: dict) -> None:
    """peftlab.json: what loading the run back needs (artifact, task facts, precision)."""
    (run_dir / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


def read_run(run_dir: str | Path) -> tuple[Recipe, dict]:
    """The recipe and info of a finished run; a clear error for anything else. The recipe's
    mixed_precision becomes the precision the run trained in (older runs: summary.json's),
    so a frozen base is stored as in training and inference can autocast the same way."""
    run_dir = Path(run_dir)
    info_path = run_dir / INFO_FILE
    if not info_path.is_file():
        raise PeftlabError(f"{run_dir}: not a finished peftlab run (no {INFO_FILE})")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or "artifact" not in info:
            raise ValueError("no 'artifact' key")
    except (OSError, ValueError) as err:
        raise PeftlabError(f"{info_path}: unreadable ({err})") from None
    recipe = load_recipe(run_dir / "recipe.yaml")
    if "precision" not in info:
        summary = run_dir / "summary.json"
        info["precision"] = json.loads(summary.read_text()).get("precision", "no") \
            if summary.is_file() else "no"
    recipe.train.mixed_precision = info["precision"]
    return recipe, info


def base_path(recipe: Recipe, info: dict) -> str:
    """The base model on this machine: the recipe's name first (pkg: paths move)."""
    try:
        return resolve_model_path(recipe.model.name, recipe)
    except PeftlabError:
        return info["base_model"]


def attach_adapter(base, folder: Path, recipe: Recipe):
    """PeftModel.from_pretrained, with a one-line error when the adapter was trained on a
    base of other shapes (the recipe's model was swapped or moved) instead of a traceback.
    LoRA loads into the fused layer it trained with (strategies._lora_config), so a bf16
    run predicts what it measured, not the same sum rounded in another order."""
    from peft import PeftConfig, PeftModel
    config = PeftConfig.from_pretrained(folder)
    if getattr(config, "peft_type", None) == "LORA" and not config.use_dora and \
            quantization_kind(recipe) == "none":
        use_fused_lora(config)
    try:
        return PeftModel.from_pretrained(base, folder, config=config)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        detail = next(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
        name = getattr(base, "name_or_path", "") or "the recipe model"
        raise PeftlabError(f"{folder}: this adapter was trained on another base model than "
                           f"{name} ({detail})") from None


def load_artifact(folder: Path, recipe: Recipe, info: dict, dequantize: bool, build):
    """(model in eval mode, tokenizer) of a run whose artifact is a transformers model or
    a peft adapter over one: `build(path)` makes the model from a folder (the base, or the
    full fine-tune); the adapter goes on top of a (dequantized, for merging) base."""
    tokenizer = load_tokenizer(str(folder), recipe)
    if info["artifact"] == "adapter":
        model = build(base_path(recipe, info))
        if dequantize:
            dequantize_linears(model)
        model = attach_adapter(model, folder, recipe)
    else:
        model = build(str(folder))
    return model.eval(), tokenizer


def check_weights_files(folder: Path) -> None:
    """A truncated, empty or garbage safetensors file is a damaged run folder, not our bug:
    its header is checked (safetensors verifies it covers the file) before any loader sees
    it, so the user gets one line naming the file instead of a reader's traceback."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise PeftlabError(f"{path}: unreadable weights ({first}); the run folder is "
                               f"damaged: train again or restore it") from None


def load_trained(run_dir: str | Path, dequantize: bool = False):
    """(model in eval mode, tokenizer, recipe, info) of a finished run. dequantize=True turns
    a quantized base into full-precision linears before the adapter goes on (for merging).
    Run inference under `precision_context(info["precision"], device)`."""
    run_dir = Path(run_dir)
    recipe, info = read_run(run_dir)
    if dequantize:  # merge into fp32 weights, also when training kept the frozen base in bf16
        recipe.train.mixed_precision = "no"
    folder = run_dir / info["artifact"]
    check_weights_files(folder)
    from peftlab.tasks import task_of_run
    model, tokenizer = task_of_run(info).load(folder, recipe, info, dequantize)
    return model, tokenizer, recipe, info
