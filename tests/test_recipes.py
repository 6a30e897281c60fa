"""Every shipped recipe trains: its data, strategy, quantization, optimizer, precision and
packing, built on a tiny model of the same architecture and run for two optimizer steps.

Validating the schema alone let `recipes/gpt2_alpaca_lora.yaml` ship while GPT-2 LoRA could
not start. Hub models cannot be downloaded here, so each hub id maps to its architecture and
gets a tiny random model of that architecture; a recipe naming an architecture this file
does not know fails until it is added below.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, reset_accelerate_state, word_tokenizer

from peftlab.config import DEFAULT_MODEL, load_recipe
from peftlab.train import run

RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + [
    REPO / "peftlab" / "quickstart" / "recipe.yaml"]
SHARED_DATA = Path(os.environ.get("PEFTLAB_DATA", REPO.parent / "shared" / "data"))
# the hub models the recipes name, by architecture (model_type)
HUB_ARCHITECTURES = {"openai-community/gpt2": "gpt2", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2",
                     "meta-llama/Meta-Llama-3-8B-Instruct": "llama",
                     "google/vit-base-patch16-224": "vit", "microsoft/resnet-50": "resnet"}
# the published configs of those models, kept for the planner (benchmarks/configs)
PUBLISHED = {"qwen2": "qwen2.5-0.5b", "llama": "llama3-8b"}


def tiny_decoder(folder: Path, model_type: str) -> Path:
    """A 2-layer, hidden-32 model of `model_type`, keeping the published config's
    architectural switches (tied embeddings, grouped-query attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    word_tokenizer(folder, pad=False)
    # room above the words, as real vocabularies have: transformers' Qwen2 tokenizer class
    # adds its own special tokens when it loads this folder
    sizes = {"vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2}
    if model_type == "gpt2":
        sizes |= {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}
    else:
        published = json.loads((REPO / "benchmarks" / "configs" / PUBLISHED[model_type] /
                                "config.json").read_text())
        sizes |= {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 128,
                  "tie_word_embeddings": published.get("tie_word_embeddings", False)}
    config = AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def tiny_vision(folder: Path, model_type: str) -> Path:
    """A tiny model of the published vision architecture at its published input (224 x 224
    RGB, the same processor class): ViT with 16 x 16 patches, ResNet with bottleneck blocks."""
    from transformers import (
        AutoModelForImageClassification,
        ConvNextImageProcessor,
        ResNetConfig,
        ViTConfig,
        ViTImageProcessor,
    )
    if model_type == "vit":
        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)
        ViTImageProcessor().save_pretrained(folder)
    else:
        config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 32, 32],
                              depths=[1, 1, 1, 1], layer_type="bottleneck")
        ConvNextImageProcessor().save_pretrained(folder)
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm_like(tmp_path_factory, tiny_bert) -> Path:
    """A tiny 6-layer BERT laid out like all-MiniLM-L6-v2 (6 layers, uncased, and a
    sentence-transformers pooling config that says mean tokens), so `pooling: auto` and
    `freeze_layers` decide as they do for MiniLM."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    folder = tmp_path_factory.mktemp("minilm_like")
    tokenizer = BertTokenizerFast.from_pretrained(tiny_bert)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=6,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, minilm_like):
    """model.name -> the tiny local model that stands in for it."""
    def stand_in(name: str) -> str:
        if name == DEFAULT_MODEL:
            return str(minilm_like)
        if name.startswith("llama2c:"):
            return name  # the real stories260K from the shared data: small enough as it is
        if (REPO / name).is_dir():
            return str(REPO / name)  # a config shipped in recipes/models: small as it is
        assert name in HUB_ARCHITECTURES, f"{name}: add its architecture to HUB_ARCHITECTURES"
        architecture = HUB_ARCHITECTURES[name]
        folder = tmp_path_factory.getbasetemp() / f"tiny_{architecture}"
        if not folder.is_dir():
            folder.mkdir()
            builder = tiny_vision if architecture in ("vit", "resnet") else tiny_decoder
            builder(folder, architecture)
        return str(folder)
    return stand_in


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_trains_on_a_tiny_model_of_its_architecture(
        path, stand_ins, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_DATA", str(SHARED_DATA))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(path)
    overrides = [f"model.name={stand_ins(recipe.model.name)}", "train.max_steps=2",
                 "train.eval_every_steps=0", "train.keep_checkpoints=0",
                 f"train.batch_size={min(recipe.train.batch_size, 4)}",
                 f"model.max_length={min(recipe.model.max_length, 128)}",
                 f"data.doc_stride={min(recipe.data.doc_stride, 32)}",
                 "data.max_train_samples=48", "data.max_eval_samples=12",
                 "eval.batch_size=4", "eval.max_new_tokens=2", "train.report_to=[none]"]
    recipe = load_recipe(path, overrides)
    result = run(recipe, output_dir=str(tmp_path / "run"))
    reset_accelerate_state()
    summary = result["summary"]
    assert summary["steps"] == 2 and summary["strategy"] == recipe.strategy.kind
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    losses = [point["loss"] for point in summary["loss_history"]]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "run" / "peftlab.json").is_file()
