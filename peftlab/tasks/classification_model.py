"""The classifier: a model with our labels and a fresh head, and which pooling it uses.

Two heads exist. The model's own `AutoModelForSequenceClassification` head ([CLS] pooler for
BERT, last token for decoders) keeps adapters loadable by plain `PeftModel.from_pretrained`.
`MeanPoolClassifier` averages token states: sentence-transformers checkpoints such as
all-MiniLM-L6-v2 were trained for that, and their [CLS] pooler carries little signal, so a
frozen body (head-only) needs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from peftlab.config import Recipe
from peftlab.models import hub_kwargs, load_error, load_tokenizer, resolve_model_path
from peftlab.quantization import guard_cpu_repacking, load_kwargs


def trained_for_mean_pooling(model_path: str) -> bool:
    """True for sentence-transformers folders whose pooling config says mean tokens."""
    pooling = Path(model_path) / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return False
    return bool(json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"))


def choose_pooling(recipe: Recipe, model_path: str) -> str:
    """auto: mean only where the body stays frozen and the model was trained for it."""
    if recipe.model.pooling != "auto":
        return recipe.model.pooling
    if recipe.strategy.kind == "head" and trained_for_mean_pooling(model_path):
        return "mean"
    return "cls"


class MeanPoolClassifier(nn.Module):
    """Backbone -> masked mean of token states -> dropout -> linear classifier."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def pool(self, input_ids=None, attention_mask=None, **inputs) -> torch.Tensor:
        """The masked mean of the backbone's token states: what the head sees."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids=None, attention_mask=None, labels=None, pooled=None,
                **inputs):
        """`pooled`: the vector pool() gave, cached (train.cache_frozen): the body is skipped."""
        if pooled is None:
            pooled = self.pool(input_ids, attention_mask, **inputs)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def label_kwargs(label_names: list[str]) -> dict:
    return {"num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)}}


def build_classifier(path: str, pooling: str, label_names: list[str], recipe: Recipe,
                     pad_token_id: int | None = None):
    """A classifier over the weights in `path` (pretrained or fine-tuned) with our labels.

    Decoders pool the last non-pad token, which needs config.pad_token_id: it is set from the
    tokenizer whenever the checkpoint has none.
    """
    labels = label_kwargs(label_names)
    quantized = load_kwargs(recipe)
    try:
        if pooling == "mean":
            config = AutoConfig.from_pretrained(path, **labels, **hub_kwargs(recipe))
            extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
            backbone = AutoModel.from_pretrained(path, config=config, **extra, **quantized,
                                                 **hub_kwargs(recipe))
            model = MeanPoolClassifier(backbone, len(label_names))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, **labels, **quantized, **hub_kwargs(recipe))
    except (OSError, ValueError, ImportError) as err:
        raise load_error(recipe.model.name, err) from None
    guard_cpu_repacking(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def load_classifier(recipe: Recipe, label_names: list[str]):
    """(model, tokenizer, pooling) for the recipe, with a freshly initialised head."""
    path = resolve_model_path(recipe.model.name, recipe)
    tokenizer = load_tokenizer(path, recipe)
    pooling = choose_pooling(recipe, path)
    model = build_classifier(path, pooling, label_names, recipe, tokenizer.pad_token_id)
    return model, tokenizer, pooling
