"""The CPU short path for attention with dropout (peftlab/fast_attention.py): the attention
transformers' SDPA computes, with fast_dropout's mask, in the run's dtype; SDPA itself
everywhere else; never written into a saved model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peftlab.config import recipe_from_dict
from peftlab.fast_attention import NAME, cpu_dropout_attention, use_fast_attention
from peftlab.fast_dropout import keep_mask
from peftlab.hardware import precision_context
from peftlab.strategies import apply_strategy


def reference(query, key, value, allowed, dropout, seed):
    """Attention by hand in fp64 with the mask keep_mask draws after `seed`."""
    torch.manual_seed(seed)
    keep = keep_mask(torch.Size([*query.shape[:3], key.shape[2]]), 1 - dropout, query.device)
    q, k, v = (t.double() for t in (query, key, value))
    scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1) * keep / (1 - dropout)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_attention_by_hand_with_the_drawn_mask(dtype, tolerance):
    torch.manual_seed(1)
    query, key, value = (torch.randn(2, 3, 5, 8, dtype=dtype, requires_grad=True)
                         for _ in range(3))
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[1, :, :, 3:] = False  # the second sequence is padded after 3 tokens
    module = nn.Module()
    module.is_causal = False
    torch.manual_seed(7)
    out, weights = cpu_dropout_attention(module, query, key, value, allowed, dropout=0.3)
    expected = reference(query, key, value, allowed, 0.3, seed=7)
    assert weights is None and out.shape == (2, 5, 3, 8) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (query, key, value), grad)
    want = torch.autograd.grad(expected, (query, key, value), grad.double())
    for mine, theirs in zip(got, want):
        torch.testing.assert_close(mine.double(), theirs.double(), atol=5 * tolerance,
                                   rtol=5 * tolerance)


def test_causal_without_a_mask_and_grouped_key_value_heads():
    torch.manual_seed(2)
    query = torch.randn(2, 4, 6, 8)
    key, value = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    torch.manual_seed(3)
    out, _ = cpu_dropout_attention(module, query, key, value, None, dropout=0.2)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = reference(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                         allowed, 0.2, seed=3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_without_dropout_it_is_transformers_sdpa():
    torch.manual_seed(4)
    query, key, value = (torch.randn(2, 3, 5, 8) for _ in range(3))
    module = nn.Module()
    module.is_causal = True
    mine, _ = cpu_dropout_attention(module, query, key, value, None, dropout=0.0)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0)
    assert torch.equal(mine, theirs)


def keep_everything(model: nn.Module) -> nn.Module:
    """Dropout rates so small that every mask keeps everything (round(keep * 2**32) is
    2**32), so training-mode outputs are the eval-mode ones while the dropout paths run."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 1e-12
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 1e-12
    return model


def saved_score_masks(model, batch, heads, seq) -> int:
    """How many (batch, heads, seq, seq) bool masks autograd keeps: one per layer when the
    short path ran."""
    found = []

    def pack(tensor):
        if tensor.dtype == torch.bool and tuple(tensor.shape) == (2, heads, seq, seq):
            found.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return len(found)


MODELS = {
    "bert": lambda: BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64),
                              add_pooling_layer=False),
    "distilbert": lambda: DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=2,
                                                           n_heads=4, hidden_dim=64)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                               n_positions=64)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1)),
}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("padded", [False, True])
def test_real_models_train_through_it_with_the_masks_sdpa_gets(family, padded):
    """Bidirectional (BERT, DistilBERT), causal (GPT-2) and causal GQA (Llama) attention, with and
    without padding, give the eval-mode SDPA output in training mode through the short
    path, which really ran (its masks are kept for backward)."""
    torch.manual_seed(0)
    model = MODELS[family]()
    assert model.config._attn_implementation == "sdpa"
    batch = {"input_ids": torch.randint(1, 50, (2, 7)),
             "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    if padded:
        batch["attention_mask"][1, 4:] = 0
    expected = model.eval()(**batch)[0]
    assert use_fast_attention(keep_everything(model)) == 1
    assert model.config._attn_implementation == NAME
    model.train()
    got = model(**batch)[0]
    rows = batch["attention_mask"].bool()  # padded query rows are free to differ
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-5)
    assert saved_score_masks(model, batch, heads=4, seq=7) == 2
    assert torch.equal(model.eval()(**batch)[0], expected)  # eval: SDPA itself


def test_bf16_keeps_no_fp32_copies_of_queries_keys_values():
    """torch's SDPA math path keeps fp32 (batch, heads, seq, head_dim) copies under bf16
    autocast; the short path keeps them in bf16."""
    torch.manual_seed(0)
    model = MODELS["bert"]().train()
    batch = {"input_ids": torch.randint(1, 50, (2, 7))}

    def fp32_head_tensors() -> int:
        found = []

        def pack(tensor):
            # (batch x heads, seq, head_dim 8) as the math path keeps them, or 4-d
            if tensor.dtype == torch.float32 and tensor.dim() >= 3 and tensor.shape[-1] == 8:
                found.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                precision_context("bf16", "cpu"):
            model(**batch)
        return len(found)

    assert fp32_head_tensors() > 0  # torch's math path
    use_fast_attention(model)
    assert fp32_head_tensors() == 0


def test_every_strategy_gets_it_and_saved_models_load_as_plain_sdpa(tmp_path, tiny_bert):
    recipe = recipe_from_dict({"model": {"name": str(tiny_bert)}, "data": {"train": "x.csv"},
                               "strategy": {"kind": "full"}})
    model = AutoModel.from_pretrained(tiny_bert)
    report = apply_strategy(model, recipe)
    assert report.model.config._attn_implementation == NAME
    report.model.save_pretrained(tmp_path / "saved")
    assert NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "saved" / "config.json")
                                                   .read_text())
    assert AutoModel.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def test_benchmark_switch_keeps_torch_sdpa(monkeypatch):
    """PEFTLAB_TORCH_ATTENTION=1 is how benchmarks/vs_trainer.py times torch's SDPA beside."""
    monkeypatch.setenv("PEFTLAB_TORCH_ATTENTION", "1")
    model = MODELS["bert"]()
    assert use_fast_attention(model) == 0 and model.config._attn_implementation == "sdpa"
