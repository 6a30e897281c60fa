"""Which parameters train: full | head | freeze | gradual | lora | dora | peft.

Every strategy is a plain function from a model to a model with the right `requires_grad`
flags (or a peft wrapper). The names that decide it are found from the model itself: the head
is whatever sits outside the backbone (`base_model`), the layers are the backbone's largest
ModuleList, so the same code serves BERT, RoBERTa, DistilBERT, GPT-2 and Llama.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.config import Recipe
from peftlab.errors import PeftlabError


@dataclass
class StrategyReport:
    model: nn.Module
    trainable: int
    total: int
    head_names: list[str]  # top-level modules of the (unwrapped) head, for the head lr
    groups: list[list[nn.Parameter]] = field(default_factory=list)  # gradual, top first

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def describe(self) -> str:
        return f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.2f}%)"


def backbone_of(model: nn.Module) -> nn.Module:
    """The pretrained body: `backbone` of our mean-pool head, else HF's base_model."""
    return model.backbone if hasattr(model, "backbone") else model.base_model


def head_names(model: nn.Module) -> list[str]:
    """Top-level children with parameters that are not the backbone (the task head)."""
    body = backbone_of(model)
    return [name for name, child in model.named_children()
            if child is not body and any(True for _ in child.parameters())]


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The backbone's transformer blocks: its ModuleList holding the most parameters."""
    lists = [m for m in backbone_of(model).modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise PeftlabError(f"{type(model).__name__}: found no layer list to freeze or unfreeze")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """Backbone parameters below the layers: embeddings (and their norm)."""
    layers = {id(p) for p in layer_stack(model).parameters()}
    body = backbone_of(model)
    return [p for name, p in body.named_parameters()
            if id(p) not in layers and re.search(r"embed|wte|wpe", name)]


def _set_trainable(params, flag: bool) -> None:
    for param in params:
        param.requires_grad_(flag)


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups from the top: head + top-of-body, last layer, ..., first, embeddings."""
    layers = list(layer_stack(model))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    embeddings = embedding_params(model)
    in_embeddings = {id(p) for p in embeddings}
    top = [p for p in model.parameters() if id(p) not in in_layers | in_embeddings]
    return [top] + [list(layer.parameters()) for layer in reversed(layers)] + [embeddings]


def open_groups(groups: list[list[nn.Parameter]], count: int) -> None:
    """Gradual unfreezing: the top `count` groups train, the rest stay frozen."""
    for index, group in enumerate(groups):
        _set_trainable(group, index < count)


def apply_full(model: nn.Module, recipe: Recipe) -> nn.Module:
    _set_trainable(model.parameters(), True)
    return model


def apply_head(model: nn.Module, recipe: Recipe) -> nn.Module:
    _set_trainable(model.parameters(), False)
    for name in head_names(model):
        _set_trainable(getattr(model, name).parameters(), True)
    return model


def apply_freeze(model: nn.Module, recipe: Recipe) -> nn.Module:
    layers = layer_stack(model)
    count = recipe.strategy.freeze_layers
    if count > len(layers):
        raise PeftlabError(f"strategy.freeze_layers={count}, but the model has only "
                           f"{len(layers)} layers")
    _set_trainable(model.parameters(), True)
    _set_trainable(embedding_params(model), False)
    for layer in list(layers)[:count]:
        _set_trainable(layer.parameters(), False)
    return model


def apply_gradual(model: nn.Module, recipe: Recipe) -> nn.Module:
    open_groups(layer_groups(model), 1)  # the head (and top of the body) first
    return model


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's own `all-linear` resolution (nn.Linear and GPT-2's Conv1D, never the output
    embeddings), minus the task head, which trains in full beside the adapter. Names are
    relative to what gets wrapped: the model, or the backbone of our mean-pool head. The
    planner counts adapters from the same list, so the two always agree."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    wrapped = model.backbone if hasattr(model, "backbone") else model
    config = LoraConfig(target_modules="all-linear", task_type=_peft_task(model))
    names = _maybe_include_all_linear_layers(config, wrapped).target_modules
    heads = set(head_names(model)) if wrapped is model else set()
    names = sorted(name for name in names if name.split(".")[0] not in heads)
    if not names:  # convolutional bodies (ResNet, ConvNeXt's stem): peft adapts Conv2d too
        names = sorted({name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules()
                        if isinstance(module, nn.Conv2d) and name.split(".")[0] not in heads})
    if not names:
        raise PeftlabError(f"{type(model).__name__}: no linear or convolution layers for "
                           f"LoRA; set strategy.target_modules")
    return names


def is_causal_lm(model: nn.Module) -> bool:
    from transformers import GenerationMixin
    return isinstance(model, GenerationMixin)


# peft's task type per transformers head class (by its name's ending), for prompt-learning
# methods, whose virtual tokens need the task's own PeftModel
PEFT_TASK_TYPES = {"ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                   "ForSequenceClassification": "SEQ_CLS"}


def _peft_task(model: nn.Module) -> str | None:
    """The task type saved in adapter_config.json: CAUSAL_LM for language models, none for
    encoder heads. peft 0.21's SEQ_CLS/TOKEN_CLS/QUESTION_ANS wrappers drop token_type_ids
    (and position_ids) on the way to the model, so a LoRA run of QA or of a text-pair
    classifier would train blind to BERT's segments, while its merged model, or the same
    weights in plain transformers, use them. The generic PeftModel passes every input
    through; the new head still travels via modules_to_save."""
    return "CAUSAL_LM" if is_causal_lm(model) else None


PROMPT_LEARNING = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}


def _prompt_task(model: nn.Module) -> str | None:
    """The task-specific type a prompt-learning method needs (prefix/prompt tuning)."""
    if hasattr(model, "backbone") or is_causal_lm(model):
        return _peft_task(model)
    name = type(model).__name__
    return next((kind for ending, kind in PEFT_TASK_TYPES.items() if name.endswith(ending)),
                "SEQ_CLS")


def _new_heads(model: nn.Module) -> list[str] | None:
    """Modules that must train and travel with an adapter: a classifier's head, never
    lm_head; and batch norms (ResNet, ConvNeXt stems), whose running statistics move in
    every training step and would otherwise be lost with the base (peft's advice)."""
    if hasattr(model, "backbone") or is_causal_lm(model):
        return None
    norms = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, nn.modules.batchnorm._BatchNorm)})
    return head_names(model) + norms


def _wrap_peft(model: nn.Module, peft_config) -> nn.Module:
    from peft import get_peft_model
    if hasattr(model, "backbone"):  # mean-pool head: adapt the body, train our head as is
        peft_config.modules_to_save = None
        model.backbone = get_peft_model(model.backbone, peft_config)
        _set_trainable(model.classifier.parameters(), True)
        return model
    return get_peft_model(model, peft_config)


def _lora_config(model: nn.Module, recipe: Recipe, use_dora: bool):
    from peft import LoraConfig
    s = recipe.strategy
    targets = s.target_modules or default_target_modules(model)
    config = LoraConfig(task_type=_peft_task(model), r=s.lora_r, lora_alpha=s.lora_alpha,
                        lora_dropout=s.lora_dropout, target_modules=targets, use_dora=use_dora,
                        modules_to_save=_new_heads(model))
    from peftlab.quantization import quantization_kind
    if not use_dora and quantization_kind(recipe) == "none":
        from peftlab.fused_lora import use_fused_lora
        use_fused_lora(config)  # bitsandbytes layers subclass nn.Linear: keep peft's for them
    return config


def apply_lora(model: nn.Module, recipe: Recipe) -> nn.Module:
    return _wrap_peft(model, _lora_config(model, recipe, use_dora=False))


def apply_qlora(model: nn.Module, recipe: Recipe) -> nn.Module:
    """LoRA on a 4-bit base (models.py loads it quantized for this kind)."""
    return _wrap_peft(model, _lora_config(model, recipe, use_dora=False))


def apply_dora(model: nn.Module, recipe: Recipe) -> nn.Module:
    return _wrap_peft(model, _lora_config(model, recipe, use_dora=True))


def _name_feedforward_modules(peft_config, model: nn.Module) -> None:
    """IA3 scales the inputs of its feed-forward targets, which must be a subset of the
    targets. With our full target names, its short per-architecture defaults ("output.dense")
    would fail that check when the adapter is loaded again: name them in full too."""
    if not hasattr(peft_config, "feedforward_modules"):
        return
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as DEFAULTS
    wanted = peft_config.feedforward_modules or DEFAULTS.get(model.config.model_type, [])
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    peft_config.feedforward_modules = [
        name for name in peft_config.target_modules
        if any(name == short or name.endswith("." + short) for short in wanted)]


def apply_peft(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Any peft method from its config fields, e.g. {peft_type: IA3, target_modules: [...]}."""
    from peft import get_peft_config
    fields = dict(recipe.strategy.peft)
    prompt = str(fields.get("peft_type", "")).upper() in PROMPT_LEARNING
    fields.setdefault("task_type", _prompt_task(model) if prompt else _peft_task(model))
    if _new_heads(model):
        fields.setdefault("modules_to_save", _new_heads(model))
    try:
        peft_config = get_peft_config(fields)
    except (KeyError, TypeError, ValueError) as err:
        raise PeftlabError(f"strategy.peft: not a valid peft config ({err})") from None
    if hasattr(peft_config, "target_modules") and not peft_config.target_modules:
        peft_config.target_modules = default_target_modules(model)
        _name_feedforward_modules(peft_config, model)
    try:
        return _wrap_peft(model, peft_config)
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise PeftlabError(f"strategy.peft: peft rejected the config ({first})") from None


STRATEGIES = {
    "full": apply_full, "head": apply_head, "freeze": apply_freeze, "gradual": apply_gradual,
    "lora": apply_lora, "dora": apply_dora, "qlora": apply_qlora, "peft": apply_peft,
}
PEFT_KINDS = ("lora", "dora", "qlora", "peft")


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward. Non-reentrant, so frozen embeddings (LoRA, k-bit)
    need no inputs-require-grad trick to keep gradients flowing."""
    target = model.backbone if hasattr(model, "backbone") else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_trainable_fp32(model: nn.Module) -> None:
    """Optimizer updates in bf16 lose small steps: whatever trains lives in fp32, also when
    the frozen base was loaded in bf16 (peft already does this for LoRA weights, not heads)."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def apply_strategy(model: nn.Module, recipe: Recipe) -> StrategyReport:
    """Set what trains; for `gradual`, the report's groups drive unfreezing in the loop.
    Dropout modules get the cheaper CPU mask (peftlab/fast_dropout.py), and SDPA attention
    with dropout its CPU short path (peftlab/fast_attention.py), for every strategy."""
    from peftlab.fast_attention import use_fast_attention
    from peftlab.fast_dropout import use_fast_dropout
    from peftlab.quantization import prepare_kbit
    use_fast_dropout(model)
    use_fast_attention(model)
    heads = head_names(model)
    groups = layer_groups(model) if recipe.strategy.kind == "gradual" else []
    if recipe.strategy.kind in PEFT_KINDS:
        model = prepare_kbit(model, recipe)  # a no-op for unquantized bases
    if recipe.train.gradient_checkpointing:
        enable_checkpointing(model)
    if recipe.model.adapter:
        from peftlab.adapters import continue_adapter
        model = continue_adapter(model, recipe)
    else:
        model = STRATEGIES[recipe.strategy.kind](model, recipe)
    keep_trainable_fp32(model)
    trainable, total = count_parameters(model)
    return StrategyReport(model=model, trainable=trainable, total=total, head_names=heads,
                          groups=groups)
