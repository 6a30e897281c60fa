"""Decoders as classifiers: Llama and GPT-2 through AutoModelForSequenceClassification."""

import pytest
import torch
from conftest import write_recipe

from peftlab.artifacts import load_trained
from peftlab.config import load_recipe, recipe_from_dict
from peftlab.models import load_tokenizer
from peftlab.strategies import apply_strategy, layer_groups
from peftlab.tasks.classification_model import build_classifier
from peftlab.train import run


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_decoder_strategies_find_layers_head_and_embeddings(request, fixture):
    path = request.getfixturevalue(fixture)
    recipe = recipe_from_dict({"model": {"name": str(path)}, "data": {"train": "x"},
                               "strategy": {"kind": "gradual"}})
    model = build_classifier(str(path), "cls", ["neg", "pos"], recipe)
    groups = layer_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    top = {names[id(p)] for p in groups[0]}
    assert "score.weight" in top
    assert any(n.endswith(("norm.weight", "ln_f.weight")) for n in top)
    assert len(groups) == 4
    assert all("embed" in names[id(p)] or "wte" in names[id(p)] or "wpe" in names[id(p)]
               for p in groups[-1])
    report = apply_strategy(model, recipe_from_dict({
        "model": {"name": str(path)}, "data": {"train": "x"}, "strategy": {"kind": "head"}}))
    assert {n for n, p in report.model.named_parameters() if p.requires_grad} == {
        "score.weight"}


def test_llama_lora_classifier_pads_and_pools_the_last_token(tmp_path, tiny_llama,
                                                            sentiment_csv):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_llama, sentiment_csv,
                                      train={"max_steps": 10}))
    tokenizer = load_tokenizer(str(tiny_llama), recipe)
    assert tokenizer.pad_token == tokenizer.eos_token  # decoders ship no pad token
    result = run(recipe, output_dir=str(tmp_path / "run"))
    assert result["summary"]["steps"] == 10
    model, tokenizer, *_ = load_trained(tmp_path / "run")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
            if "lora_A" in n}
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj"}
    # the logits of a padded batch equal those of each text alone: pooling skips padding
    texts = ["the movie was great", "a really quite boring and awful film with music"]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        together = model(**batch).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_default_lora_targets_follow_peft_all_linear_and_the_planner_agrees(request, fixture,
                                                                            kind, task):
    """GPT-2's projections are Conv1D, not nn.Linear: peft's all-linear resolution finds
    them (and never the output embeddings or the new head), and the planner counts exactly
    the adapters the strategy creates."""
    from transformers import AutoModelForCausalLM

    from peftlab.memory import trainable_params
    from peftlab.model_shape import shape_of
    path = request.getfixturevalue(fixture)
    recipe = recipe_from_dict({"model": {"name": str(path), "task": task},
                               "data": {"train": "x"}, "strategy": {"kind": kind},
                               "train": {"mixed_precision": "no"}})
    model = AutoModelForCausalLM.from_pretrained(str(path)) if task == "causal_lm" else \
        build_classifier(str(path), "cls", ["neg", "pos"], recipe)
    per_layer = 7 if fixture == "tiny_llama" else 4  # q,k,v,o,gate,up,down | c_attn,c_proj x2,c_fc
    report = apply_strategy(model, recipe)
    adapted = {n.split(".lora_A")[0] for n, _ in report.model.named_parameters()
               if ".lora_A" in n}
    assert len(adapted) == 2 * per_layer
    assert not any(part in name for name in adapted for part in ("lm_head", "score"))
    assert trainable_params(shape_of(recipe), recipe, kind) == report.trainable


def test_ia3_with_default_targets_reloads_in_plain_peft(tmp_path, tiny_bert):
    """Default targets are full module names; IA3's feed-forward subset must be named the
    same way, or peft refuses the saved adapter when it loads it again."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert)}, "data": {"train": "x"},
                               "strategy": {"kind": "peft", "peft": {"peft_type": "IA3"}},
                               "train": {"mixed_precision": "no"}})
    model = apply_strategy(build_classifier(str(tiny_bert), "cls", ["neg", "pos"], recipe),
                           recipe).model
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    config = reloaded.peft_config["default"]
    assert config.feedforward_modules and config.feedforward_modules <= config.target_modules
    assert any(name.endswith("output.dense") for name in config.feedforward_modules)
