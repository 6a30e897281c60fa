"""Decoders as classifiers: Llama and GPT-2 through AutoModelForSequenceClassification."""

import pytest
import torch
from conftest import write_recipe

from peftlab.artifacts import load_trained
from peftlab.config import load_recipe, recipe_from_dict
from peftlab.models import build_classifier, load_tokenizer
from peftlab.strategies import apply_strategy, layer_groups
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
