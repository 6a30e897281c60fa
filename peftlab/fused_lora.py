"""A faster LoRA Linear for training: same parameters and file format as peft's, fewer passes.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: the scaling multiplies and the sum adds
over a full (tokens x out_features) tensor, forward and backward, for every adapted layer. On
MiniLM that made LoRA r=16 barely cheaper per step than full fine-tuning although it skips all
weight gradients. Here the scaling goes on the thin (tokens x r) tensor and the sum is fused
into the GEMM (`addmm` accumulates into the base output), which removes both passes. The
layer is registered through peft's custom-module hook, so adapters still save and load as
plain peft LoRA (`PeftModel.from_pretrained` needs nothing from peftlab).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


class FusedLoraLinear(PeftLoraLinear):
    """peft's lora.Linear with a fused forward for the common case; anything unusual (several
    or mixed adapters, dropout, DoRA and other variants, merged weights, a LoRA bias) goes
    through peft's own forward unchanged."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (args or kwargs or name is None or self.disable_adapters or self.merged
                or name not in self.lora_A or name in self.lora_variant
                or not isinstance(self.lora_dropout[name], nn.Identity)
                or self.lora_B[name].bias is not None):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        thin = nn.functional.linear(x.to(lora_a.dtype), lora_a) * self.scaling[name]
        fused = torch.addmm(result.reshape(-1, result.shape[-1]),
                            thin.reshape(-1, thin.shape[-1]).to(result.dtype),
                            lora_b.t().to(result.dtype))
        return fused.view(result.shape)


def use_fused_lora(peft_config) -> None:
    """Route plain nn.Linear targets to FusedLoraLinear (quantized bases keep peft's layers)."""
    peft_config._register_custom_module({nn.Linear: FusedLoraLinear})
