"""Attention for CPU training with attention dropout: bf16 matmuls and the cheap dropout mask.

With dropout on, torch's SDPA has no fused CPU kernel and takes its math path: under bf16
it upcasts Q, K and V to fp32, computes the scores, softmax and context in fp32, draws the
dropout with `bernoulli_` (one serial draw and float compare per score) and keeps fp32
copies of all of it for backward. A MiniLM LoRA step at 32 x 24 tokens in bf16 took 134 ms
that way and 123 ms this way (benchmarks/step_time.py --torch-attention); on SST-2's short
batches the whole job's step is 3% faster (benchmarks/results/fast_attention_ab_cpu.md).

Here the scores and the context are matmuls in the input's dtype (bf16 GEMMs accumulate in
fp32), the softmax runs in fp32 and is cast back, as transformers' eager attention does, and
the dropout mask comes from peftlab/fast_dropout.py (same distribution, torch's generator, a
1-byte mask for backward). Everything else, evaluation and prediction (dropout 0), other
devices, and what the short path below does not cover (position biases, soft-capping,
attention weights asked for) goes to transformers' own SDPA function unchanged. The
implementation's name lives on the in-memory config only: transformers never writes
`_attn_implementation` to config.json, so saved models load as plain SDPA models.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from peftlab.fast_dropout import _MaskedScale, keep_mask

NAME = "peftlab_sdpa"
_UNCOVERED = ("position_bias", "softcap", "output_attentions", "s_aux", "sinks")


def cpu_dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: (batch, heads, seq, dim) in, the context as
    (batch, seq, heads, dim) and no weights out."""
    if (not 0 < dropout < 1 or query.device.type not in ("cpu", "meta")
            or any(kwargs.get(name) is not None and kwargs.get(name) is not False
                   for name in _UNCOVERED)):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool,
                                    device=query.device).tril(key.shape[2] - query.shape[2])
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask[..., :key.shape[2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = _MaskedScale.apply(probs, keep_mask(probs.shape, 1 - dropout, probs.device),
                               1 / (1 - dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, cpu_dropout_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks SDPA gets, unchanged


def use_fast_attention(model: nn.Module, enable: bool = True) -> int:
    """Point every config of the model that runs SDPA at the function above (the same
    function as SDPA outside CPU training with dropout), or back (`enable` False: the
    planner's meta-device census of a GPU run, where SDPA's kernels apply dropout); returns
    how many configs changed."""
    if enable and os.environ.get("PEFTLAB_TORCH_ATTENTION") == "1":
        return 0  # torch's SDPA kept: benchmarks/vs_trainer.py measures it side by side
    old, new = ("sdpa", NAME) if enable else (NAME, "sdpa")
    configs = {id(config): config for module in model.modules()
               if (config := getattr(module, "config", None)) is not None
               and getattr(config, "_attn_implementation", None) == old}
    for config in configs.values():
        config._attn_implementation = new
    return len(configs)
