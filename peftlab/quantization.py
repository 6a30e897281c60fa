"""bitsandbytes quantized bases (nf4 / fp4 / int8) and the guards they need.

QLoRA = a 4-bit base + LoRA: memory for the frozen weights drops ~4x (plus ~0.5 bit/param of
quantization constants, ~0.13 with double quantization).
"""

from __future__ import annotations

import torch

from peftlab.config import Recipe
from peftlab.hardware import cpu_has_native_bf16, resolve_precision


def quantization_kind(recipe: Recipe, kind: str | None = None) -> str:
    """The recipe's quantization; qlora without one means nf4. `kind` asks for another
    strategy on the same recipe (the memory planner compares them all)."""
    if (kind or recipe.strategy.kind) == "qlora" and recipe.model.quantization == "none":
        return "nf4"
    return recipe.model.quantization


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """bf16 where the hardware has it natively, else fp32; never fp16 unless asked, since
    fp16 QLoRA is a known upstream source of NaN losses."""
    if recipe.model.compute_dtype != "auto":
        return getattr(torch, recipe.model.compute_dtype)
    on_gpu = torch.cuda.is_available() and not recipe.train.cpu
    if on_gpu and torch.cuda.is_bf16_supported() or not on_gpu and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


# heads stay in full precision: a new classifier trains in full (peft copies it into
# modules_to_save, which a 4-bit layer does not survive) and the output projection is small
# next to the body; naming the list replaces transformers' default, so lm_head is in it
KEEP_UNQUANTIZED = ("lm_head", "classifier", "score", "pre_classifier", "qa_outputs")


def quantization_config(recipe: Recipe):
    """BitsAndBytesConfig for from_pretrained, or None for an unquantized base."""
    kind = quantization_kind(recipe)
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(KEEP_UNQUANTIZED))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                              bnb_4bit_use_double_quant=recipe.model.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(recipe),
                              llm_int8_skip_modules=list(KEEP_UNQUANTIZED))


# strategies whose base weights never train: under bf16 autocast they are stored in bf16
# (half of fp32), while what trains is kept in fp32 (see strategies.keep_trainable_fp32)
FROZEN_BASE_KINDS = ("lora", "dora", "peft", "head")


def frozen_base_in_bf16(recipe: Recipe) -> bool:
    return (recipe.strategy.kind in FROZEN_BASE_KINDS and quantization_kind(recipe) == "none"
            and resolve_precision(recipe.train.mixed_precision, recipe.train.cpu) == "bf16")


def load_kwargs(recipe: Recipe) -> dict:
    """from_pretrained keywords for the base: safetensors only, its quantization, if any, and
    bf16 storage for a frozen base under bf16 training (an 8B LoRA base: 16 GB not 32 GB)."""
    # weights only from safetensors: a pickled pytorch_model.bin can run code when loaded
    safe = {"use_safetensors": True}
    config = quantization_config(recipe)
    if config is not None:
        return {"quantization_config": config, **safe}
    return {"dtype": torch.bfloat16, **safe} if frozen_base_in_bf16(recipe) else safe


def guard_cpu_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 CPU inference.

    Linear4bit repacks its weight in place on the first CPU forward in eval mode under
    no_grad when `support_avx512bf16_for_cpu` is set; measured here, LoRA gradients after
    that are silently wrong (relative error ~1.65 against the unrepacked ones). Training
    evaluates between steps, so the flag is cleared on every 4-bit layer. Returns how many.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def prepare_kbit(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """peft's k-bit preparation (norms in fp32, inputs require grad) for quantized bases."""
    if quantization_kind(recipe) == "none":
        return model
    from peft import prepare_model_for_kbit_training
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})


def dequantize_linears(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes 4-bit/8-bit linear by an nn.Linear holding its dequantized
    weights: the exact base an adapter trained against, in full precision, ready to merge."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, kinds)]
    for name, module in targets:
        state = getattr(module.weight, "quant_state", None) or getattr(module, "state", None)
        weight = dequantize_bnb_weight(module.weight, state=state).to(dtype)
        plain = torch.nn.Linear(module.in_features, module.out_features,
                                bias=module.bias is not None, dtype=dtype)
        plain.weight.data.copy_(weight)
        if module.bias is not None:
            plain.bias.data.copy_(module.bias.data.to(dtype))
        plain.requires_grad_(False)  # a frozen base stays frozen
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    if targets and hasattr(model, "config"):
        model.config.quantization_config = None
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if hasattr(model, flag):
                setattr(model, flag, False)
        for attribute in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attribute):
                setattr(model, attribute, None)
    return len(targets)
