"""FastDropout (peftlab/fast_dropout.py): torch's dropout distribution from torch's generator,
a 1-byte mask kept for backward, and every strategy's model gets it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftlab.fast_dropout import FastDropout, keep_mask, masked, use_fast_dropout


def fast(p: float) -> nn.Dropout:
    module = nn.Dropout(p)
    use_fast_dropout(module)
    return module


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_mask_keeps_each_element_with_probability_keep(keep):
    count = 4_000_000
    mask = keep_mask(torch.Size([count]), keep, torch.device("cpu"))
    sigma = math.sqrt(keep * (1 - keep) / count)
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - keep) < 5 * sigma
    # independent elements: neighbours (the two halves of one 64-bit draw among them) agree
    # as often as two independent draws would
    pairs = mask.view(-1, 2)
    both = (pairs[:, 0] & pairs[:, 1]).float().mean().item()
    assert abs(both - keep * keep) < 5 * math.sqrt(keep * keep * (1 - keep * keep) / (count / 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradient_are_dropout_with_the_drawn_mask(dtype):
    x = torch.randn(8, 16, 32, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    module = fast(0.25).train()
    out = module(x)
    out.backward(grad)
    kept = out != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    assert torch.equal(out, torch.where(kept, x.detach() * (1 / 0.75), 0).to(dtype))
    assert torch.equal(x.grad, torch.where(kept, grad * (1 / 0.75), 0).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_reads_the_bool_mask_as_bytes_with_the_same_values(dtype):
    x = torch.randn(4, 32, dtype=dtype)
    x[0, :3] = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
    mask = torch.rand(4, 32) < 0.5
    mask[0, :3] = torch.tensor([False, True, False])
    out = masked(x, mask)
    assert out.dtype == dtype
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    # bit for bit x * mask, nan where inf or nan meets 0 included
    assert torch.equal(out.view(bits), (x * mask).view(bits))
    assert out[0, :3].isnan().tolist() == [True, False, True]


def test_same_seed_same_mask_and_new_draws_differ():
    x = torch.randn(64, 64)
    module = fast(0.5).train()
    torch.manual_seed(3)
    first, second = module(x), module(x)
    torch.manual_seed(3)
    assert torch.equal(module(x), first)
    assert not torch.equal(first, second)


def test_eval_mode_and_p_zero_pass_through():
    x = torch.randn(4, 8)
    assert torch.equal(fast(0.5).eval()(x), x)
    assert torch.equal(fast(0.0).train()(x), x)
    assert torch.equal(fast(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("keep", [1 - 1e-12, 1 - 2**-32])
def test_keep_rates_next_to_one_keep_everything(keep):
    """keep * 2**32 rounds to 2**32 (or to the last word below it): the signed threshold
    would leave int32's range there, and a wrapped compare would drop everything."""
    mask = keep_mask(torch.Size([100_000]), keep, torch.device("cpu"))
    assert mask.float().mean().item() > 0.999


def test_backward_keeps_a_one_byte_mask_not_a_noise_tensor():
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast(0.1).train()(x)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.bool, x.numel())]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nn.Dropout(0.1).train()(x)  # torch's: a bf16 noise tensor, twice the bytes
    assert sum(t.numel() * t.element_size() for t in saved) == 2 * x.numel()


def test_checkpoint_recompute_redraws_the_same_mask():
    layer = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.Linear(16, 16)).train()
    use_fast_dropout(layer)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(5)
    layer(x).sum().backward()
    plain = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    torch.manual_seed(5)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, layer.parameters(), strict=True))


def test_every_plain_dropout_of_a_model_is_swapped_in_place():
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=50))
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert use_fast_dropout(model) == len(dropouts) > 0
    assert all(type(m) is FastDropout for m in dropouts)
    assert model.state_dict().keys() == BertModel(model.config).state_dict().keys()


def test_strategies_train_with_fast_dropout():
    from transformers import BertConfig, BertForSequenceClassification

    from peftlab.config import recipe_from_dict
    from peftlab.strategies import apply_strategy
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=50))
    recipe = recipe_from_dict({"model": {"name": "x"}, "data": {"train": "x.tsv"},
                               "strategy": {"kind": "full"}})
    report = apply_strategy(model, recipe)
    kinds = {type(m) for m in report.model.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {FastDropout}
