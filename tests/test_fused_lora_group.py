"""Q, K and V computed together (peftlab/fused_lora_group.py) give what the layers give one
by one, in values and gradients, and the grouping stays correct when it does not apply."""

import pytest
import torch
from test_fused_lora import (
    PRECISIONS,
    assert_close,
    autocast,
    lora_model,
    loss_and_grads,
    randomise_adapters,
    storages_saved_by,
)

from peftlab.fused_lora import FusedLoraLinear, _ungroup


def ungrouped_model(tiny_bert, monkeypatch, precision="no", **strategy):
    with monkeypatch.context() as patch:
        patch.setenv("PEFTLAB_UNGROUPED_LORA", "1")
        return lora_model(tiny_bert, True, precision, **strategy)


def attention(model):
    """The first self-attention block: its query, key and value layers."""
    block = next(m for m in model.modules() if isinstance(getattr(m, "query", None),
                                                          FusedLoraLinear))
    return block.query, block.key, block.value


def backward_names(model, batch, precision):
    """The autograd node of each attention projection's output in one training forward."""
    names, handles = {}, []

    def record(module, args, out):
        names.setdefault(id(module), type(out.grad_fn).__name__)

    for layer in attention(model):
        handles.append(layer.register_forward_hook(record))
    loss_and_grads(model, batch, precision)
    for handle in handles:
        handle.remove()
    return [names[id(layer)] for layer in attention(model)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_grouped_qkv_matches_the_layers_one_by_one(tiny_bert, monkeypatch, precision):
    grouped = lora_model(tiny_bert, True, precision)
    alone = ungrouped_model(tiny_bert, monkeypatch, precision)
    for model in (grouped, alone):
        randomise_adapters(model)
    batch = {"input_ids": torch.randint(5, 40, (3, 9)), "attention_mask": torch.ones(3, 9)}
    assert backward_names(grouped, batch, precision) == ["FusedLoraGroupBackward"] * 3
    assert backward_names(alone, batch, precision) == ["_FusedLoraBackward"] * 3
    loss_g, grads_g = loss_and_grads(grouped, batch, precision)
    loss_a, grads_a = loss_and_grads(alone, batch, precision)
    assert torch.allclose(loss_g, loss_a, atol=1e-6 if precision == "no" else 1e-4)
    assert grads_g.keys() == grads_a.keys()
    assert sum("query.lora_A" in name for name in grads_g) == 2  # both layers' Q adapters
    for name in grads_g:
        assert_close(grads_g[name], grads_a[name], precision, name)
    grouped.eval()
    alone.eval()
    with torch.inference_mode(), autocast(precision):
        assert_close(grouped(**batch).logits.float(), alone(**batch).logits.float(),
                     precision, "logits")


def test_siblings_fed_different_inputs_dissolve_the_group(tiny_bert):
    """Cross-attention feeds key and value another tensor than query: the key layer finds a
    stashed output for another input, computes its own, and the group is gone for good."""
    model = lora_model(tiny_bert, True)
    randomise_adapters(model)
    query, key, value = attention(model)
    x, other = torch.randn(2, 5, query.in_features), torch.randn(2, 5, key.in_features)
    query(x)
    got = key(other)
    lora_a, lora_b = key.lora_A["default"].weight, key.lora_B["default"].weight
    expected = key.base_layer(other) + other @ lora_a.t() @ lora_b.t() * key.scaling["default"]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert all("_peftlab_group" not in layer.__dict__ for layer in (query, key, value))
    assert type(value(x).grad_fn).__name__ == "_FusedLoraBackward"


def test_an_input_changed_in_place_is_not_served_from_the_stash(tiny_bert):
    model = lora_model(tiny_bert, True)
    randomise_adapters(model)
    query, key, _ = attention(model)
    x = torch.randn(2, 5, query.in_features)
    with torch.no_grad():
        query(x)
        x.mul_(2)
        got = key(x)
        lora_a, lora_b = key.lora_A["default"].weight, key.lora_B["default"].weight
        expected = key.base_layer(x) + x @ lora_a.t() @ lora_b.t() * key.scaling["default"]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_layers_with_lora_dropout_run_one_by_one_in_training(tiny_bert):
    """Each layer draws its own dropout mask on x, so one stacked product cannot serve them;
    in evaluation (no dropout) they compute together again."""
    model = lora_model(tiny_bert, True, lora_dropout=0.1)
    batch = {"input_ids": torch.randint(5, 40, (3, 6)), "attention_mask": torch.ones(3, 6)}
    assert backward_names(model, batch, "no") == ["_FusedLoraBackward"] * 3
    model.eval()
    query, *_ = attention(model)
    x = torch.randn(2, 5, query.in_features, requires_grad=True)
    assert type(query(x).grad_fn).__name__ == "FusedLoraGroupBackward"


def test_grouped_layers_keep_their_input_once(tiny_bert):
    """What Q, K and V keep for backward together: the bf16 input itself (once), the stacked
    thin product (tokens x 3r), the stacked A and the three B matrices in bf16."""
    query, key, value = attention(lora_model(tiny_bert, True, "bf16"))
    x = torch.randn(4, 9, query.in_features, dtype=torch.bfloat16, requires_grad=True)
    params = {p.untyped_storage()._cdata for layer in (query, key, value)
              for p in layer.parameters()}
    sizes, held = {}, []

    def pack(tensor):
        held.append(tensor)
        if tensor.untyped_storage()._cdata not in params:
            sizes[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("bf16"):
        outs = [layer(x) for layer in (query, key, value)]
        sum(out.float().sum() for out in outs).backward()
    ranks = sum(layer.lora_A["default"].weight.shape[0] for layer in (query, key, value))
    assert x.untyped_storage()._cdata in sizes
    assert sum(sizes.values()) == 2 * (x.numel() + 4 * 9 * ranks + ranks * query.in_features
                                       + sum(layer.lora_B["default"].weight.numel()
                                             for layer in (query, key, value)))
    alone = storages_saved_by(_ungrouped(query), x.detach().requires_grad_())
    assert sum(alone.values()) < sum(sizes.values())  # one layer's share of it


def _ungrouped(layer):
    _ungroup(layer)
    return layer
