"""The exact set of trainable parameters of every strategy, on a 2-layer BERT."""

import pytest

from peftlab.config import recipe_from_dict
from peftlab.strategies import apply_strategy, layer_groups, open_groups
from peftlab.tasks.classification_model import build_classifier

LAYER0 = "bert.encoder.layer.0."
LAYER1 = "bert.encoder.layer.1."


def classifier(tiny_bert, kind, pooling="cls", **strategy):
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert), "pooling": pooling},
                               "data": {"train": "x.csv"},
                               "strategy": {"kind": kind, **strategy}})
    model = build_classifier(str(tiny_bert), pooling, ["neg", "pos"], recipe)
    return apply_strategy(model, recipe)


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything(tiny_bert):
    report = classifier(tiny_bert, "full")
    assert trainable(report.model) == {n for n, _ in report.model.named_parameters()}
    assert report.trainable == report.total


def test_head_trains_only_the_classifier(tiny_bert):
    report = classifier(tiny_bert, "head")
    assert trainable(report.model) == {"classifier.weight", "classifier.bias"}
    assert report.trainable == 32 * 2 + 2


def test_head_with_mean_pooling(tiny_bert):
    report = classifier(tiny_bert, "head", pooling="mean")
    assert trainable(report.model) == {"classifier.weight", "classifier.bias"}
    assert not any("pooler" in n for n, _ in report.model.named_parameters())


def test_freeze_first_layer(tiny_bert):
    report = classifier(tiny_bert, "freeze", freeze_layers=1)
    names = {n for n, _ in report.model.named_parameters()}
    frozen = names - trainable(report.model)
    assert frozen == {n for n in names if n.startswith((LAYER0, "bert.embeddings."))}


def test_freeze_more_layers_than_exist(tiny_bert):
    from peftlab.errors import PeftlabError
    with pytest.raises(PeftlabError, match="only 2 layers"):
        classifier(tiny_bert, "freeze", freeze_layers=3)


def test_gradual_opens_from_the_top(tiny_bert):
    report = classifier(tiny_bert, "gradual")
    model = report.model
    top = {n for n, _ in model.named_parameters()
           if n.startswith(("classifier.", "bert.pooler."))}
    assert trainable(model) == top
    open_groups(report.groups, 2)
    assert trainable(model) == top | {n for n, _ in model.named_parameters()
                                      if n.startswith(LAYER1)}
    open_groups(report.groups, len(report.groups))
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    assert len(layer_groups(model)) == 4  # top, layer 1, layer 0, embeddings


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_targets_every_body_linear_and_saves_the_head(tiny_bert, kind):
    report = classifier(tiny_bert, kind, lora_r=4)
    names = trainable(report.model)
    lora = {n for n in names if "lora_" in n}
    head = names - lora - {n for n in names if "lora_magnitude" in n}
    assert {n for n in head if "modules_to_save" in n} == head
    assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in head} == {"classifier"}
    wrapped = {n.split(".lora_")[0] for n in lora}
    per_layer = {"attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"}
    expected = {f"base_model.model.bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in per_layer}
    assert wrapped == expected | {"base_model.model.bert.pooler.dense"}
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n in names)
    # r * (in + out) per wrapped linear: 4 square 32x32 + 32->64 + 64->32 per layer, + pooler
    lora_params = 2 * (4 * 4 * 64 + 2 * 4 * 96) + 4 * 64
    magnitudes = 2 * (5 * 32 + 64) + 32 if kind == "dora" else 0  # one per output feature
    assert report.trainable == lora_params + magnitudes + 32 * 2 + 2


def test_lora_with_explicit_targets(tiny_bert):
    report = classifier(tiny_bert, "lora", lora_r=2, target_modules=["query", "value"])
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable(report.model)
               if "lora_" in n}
    assert wrapped == {"query", "value"}


def test_other_peft_methods_by_config(tiny_bert):
    report = classifier(tiny_bert, "peft", peft={
        "peft_type": "IA3", "target_modules": ["key", "value", "output.dense"],
        "feedforward_modules": ["output.dense"]})
    names = trainable(report.model)
    assert any("ia3_l" in n for n in names)
    assert all("ia3_l" in n or "classifier" in n for n in names)


def test_mean_pool_lora_adapts_body_and_trains_head(tiny_bert):
    report = classifier(tiny_bert, "lora", pooling="mean", lora_r=2)
    names = trainable(report.model)
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(n.startswith("classifier.") or "lora_" in n for n in names)


@pytest.mark.parametrize("kind", ["lora", "head"])
def test_frozen_base_is_bf16_under_bf16_training_and_what_trains_is_fp32(tiny_bert, kind):
    import torch

    from peftlab.tasks.classification_model import load_classifier
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert), "pooling": "cls"},
                               "data": {"train": "x.csv"}, "strategy": {"kind": kind},
                               "train": {"mixed_precision": "bf16", "cpu": True}})
    model, _, _ = load_classifier(recipe, ["neg", "pos"])
    report = apply_strategy(model, recipe)
    frozen = {p.dtype for p in report.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in report.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    batch = {"input_ids": torch.randint(5, 40, (2, 6)), "attention_mask": torch.ones(2, 6)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = report.model(**batch).logits.float().logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in report.model.parameters() if p.requires_grad)


def test_full_fine_tuning_keeps_fp32_weights_under_bf16(tiny_bert):
    import torch

    from peftlab.tasks.classification_model import load_classifier
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert), "pooling": "cls"},
                               "data": {"train": "x.csv"}, "strategy": {"kind": "full"},
                               "train": {"mixed_precision": "bf16", "cpu": True}})
    model, _, _ = load_classifier(recipe, ["neg", "pos"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("head", ["AutoModelForSequenceClassification",
                                  "AutoModelForQuestionAnswering",
                                  "AutoModelForTokenClassification"])
def test_adapted_encoders_see_token_types_like_their_merged_model(tiny_bert, head):
    """peft's task wrappers drop token_type_ids; peftlab's adapters must not, or a text-pair
    classifier or a QA model trains blind to BERT's segments while its merged model (and
    plain transformers) use them. The adapted model, given segments, equals its merge."""
    import copy

    import torch
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, head).from_pretrained(str(tiny_bert), num_labels=2)
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert)}, "data": {"train": "x.csv"},
                               "strategy": {"kind": "lora", "lora_r": 4}})
    adapted = apply_strategy(model, recipe).model.eval()
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter change something
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(5, 30, (2, 12))
    segments = torch.zeros_like(ids)
    segments[:, 6:] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def first_output(m, **extra):
        out = m(**inputs, **extra)
        return out.logits if hasattr(out, "logits") else out.start_logits
    with torch.no_grad():
        with_segments = first_output(adapted, token_type_ids=segments)
        without = first_output(adapted)
        merged = first_output(copy.deepcopy(adapted).merge_and_unload(),
                              token_type_ids=segments)
    torch.testing.assert_close(with_segments, merged, rtol=1e-4, atol=1e-5)
    assert (with_segments - without).abs().max() > 1e-3  # the segments reached the model
