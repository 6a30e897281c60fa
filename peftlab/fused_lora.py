"""A faster LoRA Linear for training: same parameters and file format as peft's, fewer passes.

peft computes `base(x) + lora_B(lora_A(x)) * scaling` as separate autograd steps: under bf16
autocast it first casts the bf16 input to the adapters' fp32 (a full tokens x in_features
copy, which autocast then casts back), the scaling multiplies and the sum adds over a full
tokens x out_features tensor, and backward adds the base's and the adapter's input gradients
as two more full tensors. On MiniLM those casts alone were a quarter of a LoRA step.

Here one autograd function does the whole layer: the scaling goes on the thin tokens x r
tensor, the adapter's product accumulates into the base GEMM's output (`addmm_`), and
backward forms the input gradient in one GEMM plus one accumulating thin GEMM. Nothing is
cast but the tiny adapter matrices, and LoRA dropout keeps a bool mask, not a dropped copy.
The layer is registered through peft's custom-module hook, so adapters still save and load
as plain peft LoRA (`PeftModel.from_pretrained` needs nothing from peftlab).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from peftlab.fast_dropout import keep_mask, masked


class _FusedLora(torch.autograd.Function):
    """y = x W^T + bias + scaling * (dropout(x) A^T) B^T with W and bias frozen, in one dtype.

    Dropout keeps a bool mask (1 byte per input element) instead of the dropped copy: peft
    drops an fp32 copy of the input (4 bytes) and autocast keeps a bf16 copy of that (2 more),
    for every adapted layer. Its 1 / (1 - p) goes into the scaling of the thin product."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype,
                dropout: float):
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        keep = None
        if dropout > 0:
            keep = keep_mask(flat.shape, 1 - dropout, flat.device)
            scaling = scaling / (1 - dropout)
        thin = torch.mm(flat if keep is None else masked(flat, keep), lora_a.t()).mul_(scaling)
        out = (torch.mm(flat, weight.t()) if bias is None
               else torch.addmm(bias.to(dtype), flat, weight.t()))
        out.addmm_(thin, lora_b.t())
        ctx.save_for_backward(flat, weight, lora_a, lora_b, thin, keep)
        ctx.scaling, ctx.input_shape, ctx.input_dtype = scaling, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, weight, lora_a, lora_b, thin, keep = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
        grad_thin = torch.mm(grad, lora_b).mul_(ctx.scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, weight)
            if keep is None:
                grad_x.addmm_(grad_thin, lora_a)
            else:
                grad_x.add_(masked(torch.mm(grad_thin, lora_a), keep, inplace=True))
            grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(grad_thin.t(), flat if keep is None else masked(flat, keep))
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(grad.t(), thin)
        return grad_x, None, None, grad_a, grad_b, None, None, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's lora.Linear with a fused forward and backward for the common case; anything
    unusual (several or mixed adapters, a dropout other than nn.Dropout, DoRA and other
    variants, merged weights, a LoRA bias, a base that trains) goes through peft's own
    forward unchanged. Dropout has peft's distribution (an independent Bernoulli mask per
    layer and step, from torch's generator, drawn as fast_dropout.keep_mask draws it) but not
    its random stream."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if name is None or name not in self.lora_A or name not in self.lora_dropout:
            return super().forward(x, *args, **kwargs)
        base, dropout = self.base_layer, self.lora_dropout[name]
        if (args or kwargs or self.disable_adapters or self.merged or name in self.lora_variant
                or type(dropout) not in (nn.Identity, nn.Dropout)
                or self.lora_B[name].bias is not None or type(base) is not nn.Linear
                or base.weight.requires_grad
                or base.bias is not None and base.bias.requires_grad):
            return super().forward(x, *args, **kwargs)
        rate = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        if rate >= 1:  # everything dropped: peft's own path handles the degenerate case
            return super().forward(x, *args, **kwargs)
        return _FusedLora.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                self.lora_B[name].weight, self.scaling[name],
                                _compute_dtype(x.device.type, base.weight.dtype), rate)


def _compute_dtype(device: str, stored: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the base GEMM in, else the base's own. The meta device
    has no autocast: the planner's census counts meta tensors under CPU autocast's state."""
    device = "cpu" if device == "meta" else device
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return stored


def use_fused_lora(peft_config) -> None:
    """Route plain nn.Linear targets to FusedLoraLinear (quantized bases keep peft's layers)."""
    peft_config._register_custom_module({nn.Linear: FusedLoraLinear})
