"""The fused LoRA layer computes what peft's computes, and its adapters are plain peft files.

Each comparison runs in both training precisions: "no" (fp32 throughout) and "bf16", where
the frozen base is stored in bf16 and forward and backward run under bf16 autocast, as
Accelerate runs a training step.
"""

from contextlib import nullcontext

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AutoModelForSequenceClassification

from peftlab.config import recipe_from_dict
from peftlab.fast_dropout import keep_mask
from peftlab.fused_lora import FusedLoraLinear
from peftlab.strategies import apply_strategy
from peftlab.tasks.classification_model import build_classifier

PRECISIONS = ["no", "bf16"]


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, precision: str, what: str) -> None:
    """fp32: the same numbers up to float reassociation. bf16 (8 significant bits, a rounding
    step of 2^-8 = 0.4%): both sides compute in bf16 but round in a different order (fused
    scales the thin tensor and sums inside addmm; peft rounds B(A(x)), its scaled copy and the
    sum), so they are compared by relative error over the whole tensor, within 5%. Measured
    here: at most 1.7% on a gradient and 0.6% on the logits (7e-6 on the loss, checked within
    1e-4), while a LoRA scaling 10% off moves the gradients by 43%, and a dropped scaling or
    LoRA term by ~100%."""
    if precision == "no":
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), what
        return
    error = float((ours - theirs).norm() / theirs.norm().clamp(min=1e-12))
    assert error < 0.05, (what, error)


def lora_model(tiny_bert, fused: bool, precision: str = "no", **strategy):
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert)}, "data": {"train": "x.csv"},
                               "strategy": {"kind": "lora", "lora_r": 4, **strategy},
                               "train": {"mixed_precision": precision}})
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
    """B starts at zero, which would hide a wrong LoRA path: give A and B real values. At
    0.05 (scaling 4) the update B @ A is of the size of the base weights (std 0.02), so it
    moves every output; much larger adapters make this tiny model chaotic enough that bf16
    rounding alone changes its gradients by 30%."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def loss_and_grads(model, batch, precision: str):
    model.train()
    model.zero_grad()
    torch.manual_seed(2)
    with autocast(precision):
        logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 1]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_layer_matches_peft_in_values_and_gradients(tiny_bert, precision):
    fused, plain = lora_model(tiny_bert, True, precision), lora_model(tiny_bert, False, precision)
    assert any(isinstance(m, FusedLoraLinear) for m in fused.modules())
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    assert any(isinstance(m, PeftLoraLinear) for m in plain.modules())
    base = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear)).base_layer
    assert base.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    randomise_adapters(fused)
    randomise_adapters(plain)
    batch = {"input_ids": torch.randint(5, 40, (3, 9)), "attention_mask": torch.ones(3, 9)}
    loss_f, grads_f = loss_and_grads(fused, batch, precision)
    loss_p, grads_p = loss_and_grads(plain, batch, precision)
    assert torch.allclose(loss_f, loss_p, atol=1e-6 if precision == "no" else 1e-4)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) > 4
    for name in grads_f:
        assert grads_f[name].dtype == torch.float32, name  # what trains stays fp32
        assert_close(grads_f[name], grads_p[name], precision, name)


def test_dora_falls_back_to_peft(tiny_bert):
    """DoRA takes peft's own forward, so it keeps peft's semantics exactly."""
    dora = lora_model(tiny_bert, True, kind="dora")
    assert not any(isinstance(m, FusedLoraLinear) for m in dora.modules())


def first_fused_layer(model) -> FusedLoraLinear:
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return layer


def test_dropout_is_fused_and_equals_the_same_mask_applied_by_hand(tiny_bert):
    """The fused layer draws one Bernoulli keep-mask per call from torch's generator; drawn
    again from the same seed, the mask gives peft's formula by hand, base(x) +
    B(A(x * mask / (1 - p))) * scaling, in values and in every gradient."""
    layer = first_fused_layer(lora_model(tiny_bert, True, lora_dropout=0.3)).train()
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    torch.manual_seed(11)
    ours = layer(x)
    ours.square().sum().backward()
    got = x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone()
    x.grad = lora_a.grad = lora_b.grad = None
    torch.manual_seed(11)
    keep = keep_mask(torch.Size([21, layer.in_features]), 0.7, x.device).view(x.shape)
    assert 0 < keep.float().mean() < 1
    by_hand = layer.base_layer(x) + (x * keep / 0.7) @ lora_a.t() @ lora_b.t() * \
        layer.scaling["default"]
    by_hand.square().sum().backward()
    assert torch.allclose(ours, by_hand, atol=1e-5, rtol=1e-4)
    for mine, theirs in zip(got, (x.grad, lora_a.grad, lora_b.grad)):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)
    torch.manual_seed(12)
    assert not torch.allclose(layer(x), ours)  # another draw, another mask
    layer.eval()  # no dropout outside training
    assert torch.allclose(layer(x), layer.base_layer(x) + x @ lora_a.t() @ lora_b.t()
                          * layer.scaling["default"], atol=1e-5, rtol=1e-4)


def test_dropout_mask_is_redrawn_alike_when_checkpointing_recomputes(tiny_bert):
    """Activation checkpointing reruns the forward in backward; torch restores the RNG
    state for it, so the recomputed mask is the one the forward used."""
    from torch.utils.checkpoint import checkpoint
    layer = first_fused_layer(lora_model(tiny_bert, True, lora_dropout=0.3)).train()
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        out.square().sum().backward()
        grads.append((x.grad.clone(), layer.lora_A["default"].weight.grad.clone()))
        x.grad = layer.lora_A["default"].weight.grad = layer.lora_B["default"].weight.grad = None
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def test_dropout_keeps_a_bool_mask_not_dropped_copies(tiny_bert):
    """peft drops an fp32 copy of each adapted layer's input and autocast keeps a bf16 copy
    of it; the fused layer keeps the input itself and a 1-byte mask."""
    layer = first_fused_layer(lora_model(tiny_bert, True, "bf16", lora_dropout=0.1)).train()
    x = torch.randn(4, 9, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    rank = layer.lora_A["default"].weight.shape[0]
    saved = storages_saved_by(layer, x)
    assert x.untyped_storage()._cdata in saved
    assert sum(saved.values()) == x.numel() * (2 + 1) + 2 * (
        4 * 9 * rank + rank * (layer.in_features + layer.out_features))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_adapter_loads_in_plain_peft(tiny_bert, tmp_path, precision):
    model = lora_model(tiny_bert, True, precision)
    randomise_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert "Fused" not in config and "custom" not in config
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # as the run stores it
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2,
                                                              dtype=dtype)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = {"input_ids": torch.randint(5, 40, (2, 7)), "attention_mask": torch.ones(2, 7)}
    with torch.no_grad(), autocast(precision):
        ours, theirs = model(**batch).logits.float(), reloaded(**batch).logits.float()
    assert_close(ours, theirs, precision, "logits")



def storages_saved_by(layer, x) -> dict[int, int]:
    """Storage -> bytes of what one forward keeps for backward, the layer's parameters
    excluded."""
    params = {p.untyped_storage()._cdata for p in layer.parameters()}
    sizes, held = {}, []

    def pack(tensor):
        held.append(tensor)  # alive to the end, so no storage is freed and reused
        if tensor.untyped_storage()._cdata not in params:
            sizes[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("bf16"):
        layer(x).float().sum().backward()
    return sizes


def test_fused_layer_keeps_the_bf16_input_itself(tiny_bert):
    """Under bf16 autocast peft casts the bf16 input up to the adapters' fp32 and autocast
    casts it back, so each adapted layer keeps its own fresh copy of its input (q, k and v
    keep three). The fused layer keeps the input itself, the thin (tokens x r) product and
    the adapters' bf16 copies, and returns one input gradient in the input's dtype."""
    fused, plain = (lora_model(tiny_bert, flag, "bf16") for flag in (True, False))
    layers = [next(m for m in model.modules() if isinstance(m, kind))
              for model, kind in ((fused, FusedLoraLinear), (plain, PeftLoraLinear))]
    x = torch.randn(4, 9, layers[0].in_features, dtype=torch.bfloat16, requires_grad=True)
    rank = layers[0].lora_A["default"].weight.shape[0]
    ours = storages_saved_by(layers[0], x)
    assert x.untyped_storage()._cdata in ours
    assert sum(ours.values()) == 2 * (x.numel() + 4 * 9 * rank
                                      + rank * (layers[0].in_features + layers[0].out_features))
    assert x.grad.dtype == torch.bfloat16
    theirs = storages_saved_by(layers[1], x.detach().requires_grad_())
    assert x.untyped_storage()._cdata not in theirs  # a copy instead
