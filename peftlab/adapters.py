"""`model.adapter`: start a run from an existing adapter (a folder, or a hub repo such as one
`peftlab publish` made), to train it further on new data or to evaluate it.

The adapter's own config decides the method, rank and targets; strategy.kind only has to be
an adapter kind. A base it was not trained on is a one-line error, never a traceback: by
the hub id its config names when both sides have one, else by the shapes that do not fit.
"""

from __future__ import annotations

from torch import nn

from peftlab.config import Recipe
from peftlab.errors import PeftlabError


def _check_base(config, recipe: Recipe, source: str) -> None:
    from peftlab.publish import HUB_ID, base_hub_id
    named = config.base_model_name_or_path or ""
    if not HUB_ID.fullmatch(named) or named.startswith((".", "/", "~")):
        return  # trained on a local folder: only the shapes can tell
    try:
        ours = base_hub_id(recipe)
    except PeftlabError:
        return
    if ours != named:
        raise PeftlabError(f"model.adapter {source}: trained on {named}, but model.name is "
                           f"{ours}; set model.name to the adapter's base")


def continue_adapter(model: nn.Module, recipe: Recipe) -> nn.Module:
    """The model with the recipe's adapter loaded, trainable."""
    from peft import PeftConfig, PeftModel

    from peftlab.fused_lora import use_fused_lora
    from peftlab.quantization import quantization_kind
    from peftlab.strategies import PEFT_KINDS
    source = recipe.model.adapter
    if recipe.strategy.kind not in PEFT_KINDS:
        raise PeftlabError(f"model.adapter: strategy.kind {recipe.strategy.kind} trains no "
                           f"adapter; use one of {', '.join(PEFT_KINDS)}")
    try:
        config = PeftConfig.from_pretrained(source, revision=recipe.model.revision)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PeftlabError(f"model.adapter {source}: not an adapter folder or hub repo "
                           f"({first})") from None
    _check_base(config, recipe, source)
    if getattr(config, "peft_type", None) == "LORA" and not config.use_dora and \
            quantization_kind(recipe) == "none":
        use_fused_lora(config)
    wrapped = model.backbone if hasattr(model, "backbone") else model
    try:
        adapted = PeftModel.from_pretrained(wrapped, source, config=config, is_trainable=True,
                                            revision=recipe.model.revision)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        detail = next(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
        raise PeftlabError(f"model.adapter {source}: trained on another base model than "
                           f"{recipe.model.name} ({detail})") from None
    if wrapped is model:
        return adapted
    model.backbone = adapted  # our mean-pool head: a new classifier on the adapted body
    for param in model.classifier.parameters():
        param.requires_grad = True
    return model
