"""The fused LoRA layer computes what peft's computes, and its adapters are plain peft files."""

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AutoModelForSequenceClassification

from peftlab.config import recipe_from_dict
from peftlab.fused_lora import FusedLoraLinear
from peftlab.models import build_classifier
from peftlab.strategies import apply_strategy


def lora_model(tiny_bert, fused: bool, **strategy):
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert)}, "data": {"train": "x.csv"},
                               "strategy": {"kind": "lora", "lora_r": 4, **strategy}})
    torch.manual_seed(0)
    model = build_classifier(str(tiny_bert), "cls", ["neg", "pos"], recipe)
    if not fused:
        from peftlab import fused_lora
        original = fused_lora.use_fused_lora
        fused_lora.use_fused_lora = lambda config: None
        try:
            return apply_strategy(model, recipe).model
        finally:
            fused_lora.use_fused_lora = original
    return apply_strategy(model, recipe).model


def randomise_adapters(model):
    """B starts at zero, which would hide a wrong LoRA path: give A and B real values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    torch.manual_seed(2)
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([0, 1, 1]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


def test_fused_layer_matches_peft_in_values_and_gradients(tiny_bert):
    fused, plain = lora_model(tiny_bert, True), lora_model(tiny_bert, False)
    assert any(isinstance(m, FusedLoraLinear) for m in fused.modules())
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    assert any(isinstance(m, PeftLoraLinear) for m in plain.modules())
    randomise_adapters(fused)
    randomise_adapters(plain)
    batch = {"input_ids": torch.randint(5, 40, (3, 9)), "attention_mask": torch.ones(3, 9)}
    loss_f, grads_f = loss_and_grads(fused, batch)
    loss_p, grads_p = loss_and_grads(plain, batch)
    assert torch.allclose(loss_f, loss_p, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) > 4
    for name in grads_f:
        assert torch.allclose(grads_f[name], grads_p[name], atol=1e-5, rtol=1e-4), name


def test_dropout_and_dora_fall_back_to_peft(tiny_bert):
    """Dropout and DoRA take peft's own forward, so they keep peft's semantics exactly."""
    dora = lora_model(tiny_bert, True, kind="dora")
    assert not any(isinstance(m, FusedLoraLinear) for m in dora.modules())
    with_dropout = lora_model(tiny_bert, True, lora_dropout=0.1)
    randomise_adapters(with_dropout)
    with_dropout.train()
    batch = {"input_ids": torch.randint(5, 40, (2, 7)), "attention_mask": torch.ones(2, 7)}
    torch.manual_seed(3)
    first = with_dropout(**batch).logits
    torch.manual_seed(4)
    assert not torch.allclose(first, with_dropout(**batch).logits)  # dropout really applies


def test_fused_adapter_loads_in_plain_peft(tiny_bert, tmp_path):
    model = lora_model(tiny_bert, True)
    randomise_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert "Fused" not in config and "custom" not in config
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = {"input_ids": torch.randint(5, 40, (2, 7)), "attention_mask": torch.ones(2, 7)}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
