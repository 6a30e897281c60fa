"""Memory of models the planner has no closed-form terms for (image classifiers: patches and
feature maps), counted on the meta device instead of modelled.

The model is built from its config on the meta device (no weights, no memory), the strategy
is applied as a run applies it, and one training forward pass over a meta batch runs under
saved-tensor hooks: each storage autograd keeps for backward is counted once (views and
aliases share one). That is exact for any architecture (ViT patches, ResNet and ConvNeXt feature maps,
Swin windows) where a formula per layer type would drift. bf16 autocast does not act on meta
tensors, so `MetaAutocast` applies its rule at the function level (matmuls, convolutions and
attention take bf16 inputs, losses fp32); a test holds the count against a real CPU autocast
pass. Passes over 16 and 32 examples split the count into a part per example and a fixed part
(autocast's bf16 weight copies, batch-norm statistics).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from peftlab.config import Recipe

SMALL, BIG = 16, 32  # meta batches (free at any size); their difference is per example
# what CPU and CUDA autocast run in bf16 (torch.amp's lower-precision lists, function level)
LOWER_PRECISION = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
                   F.conv_transpose2d, F.conv_transpose3d, F.scaled_dot_product_attention,
                   F.prelu, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
                   torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm,
                   torch.Tensor.mm}
FP32_OPS = {F.cross_entropy, F.nll_loss, F.mse_loss, F.binary_cross_entropy_with_logits}


@dataclass
class CensusSpec:
    """What a task gives the census: meta inputs of n examples (labels included), the loss
    its training loop takes of them, how to name them in the plan, and the bytes its read
    data holds in the training process."""

    batch: Callable[[int], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]  # the task's Task.batch_loss
    describe: str  # e.g. "1x28x28 images"
    data_bytes: float


@dataclass
class KindCensus:
    trainable: int
    weights: float  # bytes as stored: fp32, or a bf16 frozen base under bf16 training
    saved_fixed: float  # saved for backward whatever the batch
    saved_per_example: float
    largest_per_example: float  # the largest tensor any op outputs: a layer's working set


@dataclass
class Census:
    """A model's memory terms per strategy, counted on first use (one meta pass each)."""

    recipe: Recipe
    config: object
    spec: CensusSpec
    total: int
    body_linear: bool  # linear layers outside the head: what 4/8-bit bases quantize
    counted: dict = field(default_factory=dict)

    def plannable(self, kind: str) -> bool:
        return kind != "qlora" or self.body_linear

    def of(self, kind: str, checkpointing: bool, element: int, device: str) -> KindCensus:
        key = (kind, checkpointing, element, device)
        if key not in self.counted:
            self.counted[key] = count_kind(self, kind, checkpointing, element, device)
        return self.counted[key]


class FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (CPU flash, CUDA flash or memory-efficient) keeps for
    backward: Q, K, V, the output and one fp32 log-sum-exp per query row, never the
    seq x seq scores the meta device's math fallback would save. Forward only."""

    @staticmethod
    def forward(ctx, query, key, value, out):
        # laid out (batch, seq, heads, dim) as the kernels write it, so the usual
        # transpose back to (batch, seq, hidden) is a view, not a copy
        result = out.transpose(1, 2).contiguous().transpose(1, 2)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, result, logsumexp)
        return result

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("the census counts a forward pass only")


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast's casts, applied where meta tensors bypass the real one, and fused
    attention's saved set wherever the device would run a fused kernel (everywhere but CPU
    with attention dropout, which takes peftlab/fast_attention.py's path). It also keeps
    the largest output any function produced (the forward's working set)."""

    def __init__(self, cast: bool, device: str):
        super().__init__()
        self.cast, self.device, self.largest = cast, device, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.cast and (func in LOWER_PRECISION or func in FP32_OPS):
            dtype = torch.bfloat16 if func in LOWER_PRECISION else torch.float32
            args, kwargs = tree_map(lambda v: _cast(v, dtype), (args, kwargs))
        if func is F.scaled_dot_product_attention and not (
                self.device == "cpu" and kwargs.get("dropout_p", 0.0) > 0):
            with torch.no_grad():
                out = func(*args, **kwargs)
            out = FusedAttention.apply(*args[:3], out)
        else:
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel() * out.element_size())
        return out


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def census_of(recipe: Recipe, config, spec: CensusSpec) -> Census:
    from peftlab.strategies import head_names
    from peftlab.tasks import task_module
    model = task_module(recipe.model.task).meta_model(config, recipe)
    head = {id(m) for name in head_names(model) for m in getattr(model, name).modules()}
    return Census(recipe=recipe, config=config, spec=spec,
                  total=sum(p.numel() for p in model.parameters()),
                  body_linear=any(isinstance(m, nn.Linear) and id(m) not in head
                                  for m in model.modules()))


def saved_bytes(model: nn.Module, spec: CensusSpec, size: int, cast: bool,
                device: str = "cpu") -> tuple[float, float]:
    """(bytes autograd keeps for backward, largest op output) of one training forward."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, tuple[torch.Tensor, int]] = {}  # storage -> (a tensor on it, bytes)

    def pack(tensor):
        storage = tensor.untyped_storage()  # views and aliases share one, even on meta
        if storage._cdata not in params:
            kept.setdefault(storage._cdata, (tensor, storage.nbytes()))
        return tensor

    mode = MetaAutocast(cast, device)
    # CPU autocast's state on, for code that asks which dtype autocast runs in (the fused
    # LoRA layer); it casts nothing here, the meta tensors bypass it
    state = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), mode, state:
        spec.loss(model, spec.batch(size))
    return float(sum(size for _, size in kept.values())), float(mode.largest)


def count_kind(census: Census, kind: str, checkpointing: bool, element: int,
               device: str) -> KindCensus:
    """Apply `kind` to a fresh meta model as a run would and count at SMALL and BIG
    examples."""
    from peftlab.fast_attention import use_fast_attention
    from peftlab.quantization import FROZEN_BASE_KINDS
    from peftlab.strategies import apply_strategy
    from peftlab.tasks import task_module
    recipe = copy.deepcopy(census.recipe)
    recipe.strategy.kind = "lora" if kind == "qlora" else kind  # the activations of its LoRA
    recipe.model.quantization = "none"
    recipe.train.gradient_checkpointing = checkpointing
    model = task_module(recipe.model.task).meta_model(census.config, recipe)
    bf16_base = element == 2 and kind in FROZEN_BASE_KINDS and not recipe.model.from_config
    if bf16_base:
        model.to(torch.bfloat16)  # as load_kwargs stores a frozen pretrained base
    report = apply_strategy(model, recipe)
    model = report.model.train()
    use_fast_attention(model, enable=device == "cpu")  # GPUs keep SDPA's kernels
    small, _ = saved_bytes(model, census.spec, SMALL, element == 2, device)
    big, largest = saved_bytes(model, census.spec, BIG, element == 2, device)
    per_example = (big - small) / (BIG - SMALL)
    # the largest output at 32 examples is an activation, not a weight's bf16 copy
    return KindCensus(trainable=report.trainable,
                      weights=_stored_bytes(model, kind, census.recipe),
                      saved_fixed=max(small - SMALL * per_example, 0.0),
                      saved_per_example=per_example, largest_per_example=largest / BIG)


def _stored_bytes(model: nn.Module, kind: str, recipe: Recipe) -> float:
    """Weights as the run holds them; a 4/8-bit base quantizes its body's linear weights."""
    from peftlab.memory import DOUBLE_QUANT_BYTES, FP32, QUANT_BYTES
    from peftlab.quantization import quantization_kind
    total = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    quant = quantization_kind(recipe, kind)
    if kind != "qlora" or quant == "none":
        return total
    per_weight = DOUBLE_QUANT_BYTES if quant in ("nf4", "fp4") and recipe.model.double_quant \
        else QUANT_BYTES[quant]
    linear = sum(m.base_layer.weight.numel() for m in model.modules()
                 if hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Linear))
    return total - linear * (FP32 - per_weight)


def census_estimate(census: Census, recipe: Recipe, kind: str, micro_batch: int,
                    checkpointing: bool, overhead: float, device: str):
    """The planner's Estimate from counted terms: saved tensors plus a working set of two of
    the largest op outputs (an op's input and output in forward, their gradients in
    backward), with the CPU heap's calibrated slack; `gradual` ends with everything open."""
    from peftlab.memory import (
        FP32,
        OPTIMIZER_BYTES,
        SST2_FITTED_CPU_HEAP_SLACK,
        Estimate,
        element_bytes,
    )
    from peftlab.strategies import PEFT_KINDS
    counted = census.of("full" if kind == "gradual" else kind, checkpointing,
                        element_bytes(recipe, device), device)
    weights = counted.weights
    if recipe.model.from_config and kind in PEFT_KINDS:
        weights += census.total * FP32  # the initial weights kept for the run's base/
    slack = 1 + SST2_FITTED_CPU_HEAP_SLACK if device == "cpu" else 1.0
    working = 2 * counted.largest_per_example
    trainable = counted.trainable
    return Estimate(
        kind=kind, micro_batch=micro_batch, checkpointing=checkpointing, weights=weights,
        gradients=trainable * FP32, optimizer=trainable * OPTIMIZER_BYTES[recipe.train.optimizer],
        activations=(counted.saved_fixed + micro_batch * (counted.saved_per_example + working))
        * slack,
        evaluation=recipe.eval.batch_size * working * slack +
        (trainable * FP32 if device == "cpu" else 0),
        overhead=overhead, trainable=trainable)
