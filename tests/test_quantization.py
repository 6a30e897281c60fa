"""QLoRA and 8-bit bases on CPU (bitsandbytes' CPU backend), with the AVX512-BF16 trap."""

import json

import bitsandbytes as bnb
import pytest
import torch
from conftest import write_recipe
from transformers import AutoModelForCausalLM

from peftlab.config import load_recipe, recipe_from_dict
from peftlab.errors import PeftlabError
from peftlab.quantization import dequantize_linears
from peftlab.strategies import apply_strategy
from peftlab.tasks.causal_lm import load_causal_lm
from peftlab.train import run


def sft_file(tmp_path, n=64):
    rows = [{"prompt": "the movie was " + ("great" if i % 2 else "awful"),
             "completion": " nice" if i % 2 else " bad"} for i in range(n)]
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def qlora_recipe(tiny_llama, **strategy):
    return recipe_from_dict({"model": {"name": str(tiny_llama), "task": "causal_lm",
                                       "compute_dtype": "float32"},
                             "data": {"train": "x"},
                             "strategy": {"kind": "qlora", "lora_r": 4, **strategy}})


def lora_grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_qlora_gradients_match_the_dequantized_reference_after_an_eval_pass(tiny_llama,
                                                                             monkeypatch):
    # every 4-bit layer starts with the trap armed, as on an AVX512-BF16 CPU, so a missing
    # guard shows on any host (bitsandbytes reads its detection when a layer is built)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    recipe = qlora_recipe(tiny_llama)
    model = apply_strategy(load_causal_lm(str(tiny_llama), recipe), recipe).model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # non-zero B so every LoRA weight has grad
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    ids = torch.randint(3, 40, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the pass that repacks weights on AVX512-BF16 CPUs
    quantized = lora_grads(model, ids)

    reference = apply_strategy(load_causal_lm(str(tiny_llama), recipe), recipe).model
    assert dequantize_linears(reference) == len(layers)
    for name, param in model.named_parameters():
        if "lora_" in name:
            reference.get_parameter(name).data.copy_(param.data)
    expected = lora_grads(reference, ids)
    assert set(quantized) == set(expected) and quantized
    for name, grad in quantized.items():
        error = (grad - expected[name]).norm() / expected[name].norm().clamp(min=1e-12)
        assert error < 1e-3, (name, float(error))


def test_the_trap_is_real_without_the_guard(tmp_path):
    """What the guard prevents: with repacking allowed, an eval pass changes the gradients.
    (Repacking needs hidden sizes of 64 and more, so this Llama is a little wider.)"""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    recipe = qlora_recipe(tmp_path / "m")
    model = apply_strategy(load_causal_lm(str(tmp_path / "m"), recipe), recipe).model
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = True  # bitsandbytes' default on such CPUs
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    ids = torch.randint(3, 40, (2, 12))
    before = lora_grads(model, ids)
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except Exception as err:  # noqa: BLE001 - some CPUs cannot repack at all
        pytest.skip(f"this CPU's bitsandbytes cannot repack 4-bit weights ({err})")
    after = lora_grads(model, ids)
    worst = max(float((after[n] - before[n]).norm() / before[n].norm()) for n in before)
    assert worst > 0.1


@pytest.mark.parametrize("quantization, kind", [("nf4", "qlora"), ("int8", "lora")])
def test_quantized_bases_train_and_merge(tmp_path, tiny_llama, quantization, kind):
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_llama, sft_file(tmp_path),
        model={"task": "causal_lm", "quantization": quantization, "compute_dtype": "float32"},
        strategy={"kind": kind, "lora_r": 8}, eval={"max_new_tokens": 2},
        train={"epochs": 3, "batch_size": 8, "lr": 2e-2, "optimizer": "adamw_8bit"}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    history = result["summary"]["eval_history"]
    assert history[-1]["loss"] < history[0]["loss"]

    from peftlab.artifacts import load_trained
    from peftlab.cli import main
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
                   for m in merged.modules())
    adapter, tokenizer, *_ = load_trained(tmp_path / "run")
    ids = tokenizer(["the movie was great"], return_tensors="pt")
    with torch.no_grad():
        difference = (merged(**ids).logits - adapter(**ids).logits).abs().max()
    assert difference < (1e-4 if quantization == "nf4" else 5e-2)


def test_quantization_needs_an_adapter_strategy():
    with pytest.raises(PeftlabError, match="quantized weights cannot train"):
        recipe_from_dict({"data": {"train": "x"}, "model": {"quantization": "nf4"},
                          "strategy": {"kind": "full"}})
    with pytest.raises(PeftlabError, match="qlora is a 4-bit base"):
        recipe_from_dict({"data": {"train": "x"}, "model": {"quantization": "int8"},
                          "strategy": {"kind": "qlora"}})


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_activation_checkpointing_keeps_lora_gradients(tiny_llama, quantization):
    """Checkpointing recomputes activations; with a frozen base and LoRA (and a k-bit base)
    gradients must still reach the adapters, unchanged."""
    grads = []
    for checkpointing in (False, True):
        recipe = recipe_from_dict({
            "model": {"name": str(tiny_llama), "task": "causal_lm",
                      "quantization": quantization, "compute_dtype": "float32"},
            "data": {"train": "x"}, "strategy": {"kind": "lora", "lora_r": 4},
            "train": {"gradient_checkpointing": checkpointing}})
        torch.manual_seed(0)
        model = apply_strategy(load_causal_lm(str(tiny_llama), recipe), recipe).model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.fill_(0.05)
        assert model.base_model.model.model.gradient_checkpointing == checkpointing
        grads.append(lora_grads(model, torch.arange(3, 15).view(1, -1)))
    assert grads[0] and set(grads[0]) == set(grads[1])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_qlora_classifier_keeps_its_head_in_full_precision_and_trains_it(tmp_path, tiny_bert,
                                                                         sentiment_csv):
    """The new head must not be quantized: peft copies it into modules_to_save, and a copied
    4-bit layer fails on its first forward (found by the strategies benchmark)."""
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_bert, sentiment_csv,
        model={"compute_dtype": "float32", "pooling": "cls"},
        strategy={"kind": "qlora", "lora_r": 4}, train={"epochs": 1}))
    run(recipe, output_dir=str(tmp_path / "run"))
    from peftlab.artifacts import load_trained
    model, *_ = load_trained(tmp_path / "run")
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and not any("classifier" in n for n in quantized)
    head = model.base_model.model.classifier
    trained, original = head.modules_to_save["default"].weight, head.original_module.weight
    assert trained.dtype == torch.float32 and not torch.equal(trained, original)
