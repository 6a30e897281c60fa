"""Predict a run's peak memory per strategy before it starts, and recommend what fits.

Peak = weights (by storage dtype, 4/8-bit with their quantization constants) + gradients and
optimizer states of what trains + activations saved for backward (micro-batch x sequence x
the tensors each layer keeps, fewer with checkpointing, one chunk of logits over the
vocabulary for causal LMs) + the best-weights snapshot + runtime overhead. On CPU the
overhead is what the Python stack itself takes (measured in this process after importing
it, the same libraries a run loads); on GPU peak allocated memory has no such term. The
benchmark holds these numbers against measured peaks (benchmarks/results), and a test keeps
them honest on tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.census import Census, census_estimate
from peftlab.config import Recipe
from peftlab.layer_bytes import (
    FP32,
    adapter_input_bytes,
    attention_heap_bytes,
    layer_activation_bytes,
)
from peftlab.model_shape import ModelShape, lora_params, shape_of
from peftlab.quantization import FROZEN_BASE_KINDS, quantization_kind
from peftlab.tasks import task_module

MB = 2**20
GiB = 2**30
# bytes per weight of a quantized Linear: 4-bit codes + one fp32 absmax per 64 weights, or
# with double quantization an 8-bit absmax per 64 and an fp32 constant per 256 of those;
# int8 (LLM.int8): one byte + an fp32 scale per output row (negligible)
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "int8": 1.0}
DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw": 8, "paged_adamw_8bit": 2}
PLAN_KINDS = ("full", "freeze", "gradual", "lora", "dora", "qlora", "head")
ADAPTER_KINDS = ("lora", "dora", "qlora")  # LoRA-shaped adapters the planner can count


@dataclass
class Estimate:
    """Peak = overhead + weights + optimizer states + the largest of three moments: backward
    starting (saved activations and one layer's working set live), backward ending (the
    activations are freed as it goes and every gradient is there; gradients are freed after
    each optimizer step, so they never meet the next forward's activations) and an
    evaluation (the best-weights snapshot and one layer's forward at the eval batch)."""

    kind: str
    micro_batch: int
    checkpointing: bool
    weights: float  # bytes, like every field below
    gradients: float
    optimizer: float
    activations: float  # saved for backward, plus one layer's backward working set
    evaluation: float  # snapshot + one layer's forward at the eval batch
    overhead: float  # CPU: the Python stack and the data in memory; GPU: 0
    trainable: int
    cache: float = 0.0  # train.cache_frozen's features in memory, alive the whole run

    @property
    def total(self) -> float:
        moments = (self.activations, self.gradients, self.evaluation)
        return self.overhead + self.weights + self.optimizer + self.cache + max(moments)


def trainable_params(shape: ModelShape, recipe: Recipe, kind: str) -> int:
    s = recipe.strategy
    if kind in ("full", "gradual"):  # gradual ends with everything open
        return shape.total
    if kind == "head":
        return shape.head
    if kind == "freeze":
        return shape.total - shape.below_layers - s.freeze_layers * shape.layer_params
    return lora_params(shape, s.lora_r, kind == "dora") + shape.head


def trained_layers(shape: ModelShape, recipe: Recipe, kind: str) -> int:
    """Layers that keep activations: every layer above the lowest one that trains."""
    if kind == "head":
        return 0
    if kind == "freeze":
        return shape.layers - recipe.strategy.freeze_layers
    return shape.layers


def weight_bytes(shape: ModelShape, recipe: Recipe, kind: str, element: int = FP32) -> float:
    """`element` 2: bf16 training, where a frozen LoRA/DoRA/head base is stored in bf16."""
    quant = quantization_kind(recipe, kind)
    if kind not in ADAPTER_KINDS or quant == "none":
        frozen_bf16 = element == 2 and kind in FROZEN_BASE_KINDS
        base = shape.total * (2 if frozen_bf16 else FP32)
        if kind == "head" and frozen_bf16:
            base += shape.head * 2  # the head itself stays fp32
        if element == 2 and kind in ("full", "freeze", "gradual"):
            # autocast caches a bf16 copy of each trainable fp32 weight for fwd + bwd
            base += trainable_params(shape, recipe, kind) * 2
    else:
        per_weight = DOUBLE_QUANT_BYTES if quant in ("nf4", "fp4") and \
            recipe.model.double_quant else QUANT_BYTES[quant]
        quantized = shape.layers * shape.layer_linear
        base = quantized * per_weight + (shape.total - quantized) * FP32
    if kind in ADAPTER_KINDS:
        base += (lora_params(shape, recipe.strategy.lora_r, kind == "dora") + shape.head) * FP32
    return base


def _layer_bytes(shape: ModelShape, recipe: Recipe, kind: str, device: str,
                 resident: bool = False) -> float:
    """One layer's saved bytes per token for this recipe, precision and strategy; with
    `resident`, what peak RSS holds for it (attention_heap_bytes on CPU)."""
    element = element_bytes(recipe, device)
    frozen_bf16 = element == 2 and kind in FROZEN_BASE_KINDS and \
        quantization_kind(recipe, kind) == "none"
    saved = layer_activation_bytes(shape, recipe.model.max_length, element, device,
                                   fp32_norms=not frozen_bf16)
    if resident:
        saved += attention_heap_bytes(shape, recipe.model.max_length, element, device)
    return saved


def activation_bytes(shape: ModelShape, recipe: Recipe, kind: str, micro_batch: int,
                     checkpointing: bool, device: str = "cpu") -> float:
    """Saved activations plus the working set of backward: while a layer runs backward the
    gradients of its saved tensors live too (a frozen body still runs one layer's forward)."""
    tokens = micro_batch * recipe.model.max_length
    one_layer = _layer_bytes(shape, recipe, kind, device, resident=True)
    output = output_bytes(shape, recipe, tokens)
    body = saved_layers_bytes(shape, recipe, kind, micro_batch, checkpointing, device,
                              resident=True) + one_layer * tokens
    if device != "cpu":
        return body + output
    # CPU: glibc keeps freed activation blocks for the next step's reuse, fragmented by
    # batches of changing length; RSS runs above the live tensors by this calibrated share.
    # Blocks above glibc's mmap ceiling are mapped fresh and unmapped on free, so the task
    # output (the logits, a third each of the term when training) takes no slack when its
    # tensors are that large.
    mapped = output / 3 >= GLIBC_MMAP_THRESHOLD_MAX
    return body * (1 + SST2_FITTED_CPU_HEAP_SLACK) + output * (
        1 if mapped else 1 + SST2_FITTED_CPU_HEAP_SLACK)


def saved_activation_bytes(shape: ModelShape, recipe: Recipe, kind: str, micro_batch: int,
                           checkpointing: bool, device: str = "cpu") -> float:
    """What autograd keeps for backward (see layer_activation_bytes for what bf16 halves)."""
    return saved_layers_bytes(shape, recipe, kind, micro_batch, checkpointing, device) + \
        output_bytes(shape, recipe, micro_batch * recipe.model.max_length)


def output_bytes(shape: ModelShape, recipe: Recipe, tokens: int) -> float:
    """The task's output term of a training step (the logits, for a causal LM)."""
    return task_module(recipe.model.task).output_bytes(recipe, tokens, shape.vocab,
                                                       training=True)


def saved_layers_bytes(shape: ModelShape, recipe: Recipe, kind: str, micro_batch: int,
                       checkpointing: bool, device: str = "cpu",
                       resident: bool = False) -> float:
    """What the layers keep for backward, the task's output term aside (`resident`: with
    the CPU heap's attention term, see _layer_bytes)."""
    seq, element = recipe.model.max_length, element_bytes(recipe, device)
    tokens = micro_batch * seq
    layers = trained_layers(shape, recipe, kind)
    per_layer = _layer_bytes(shape, recipe, kind, device, resident) * tokens
    per_layer += adapter_input_bytes(shape, recipe, kind, element) * tokens
    if kind == "dora":
        # DoRA rescales every adapted output (a calibrated term, see below)
        outputs = sum(fan_out for _, fan_out in shape.lora_linear) / max(shape.layers, 1)
        per_layer += MINILM_FITTED_DORA_OUTPUTS_PER_LINEAR * outputs * tokens * element
        per_layer += sum(i * o for i, o in shape.lora_linear) * FP32 / max(shape.layers, 1)
    if checkpointing and layers:
        kept = layers * shape.hidden * tokens * element + per_layer  # inputs + one recomputed
    else:
        kept = layers * per_layer
    return kept


def evaluation_bytes(shape: ModelShape, recipe: Recipe, kind: str, trainable: int,
                     device: str = "cpu") -> float:
    """An evaluation: one layer's forward temporaries at the eval batch, the logits, and (on
    CPU, where it lives) the best-weights snapshot, a copy of what trains."""
    tokens = recipe.eval.batch_size * recipe.model.max_length
    layer = _layer_bytes(shape, recipe, kind, device, resident=True) * tokens
    logits = task_module(recipe.model.task).output_bytes(recipe, tokens, shape.vocab,
                                                         training=False)
    return layer + logits + (trainable * FP32 if device == "cpu" else 0)


def estimate(shape: ModelShape | Census, recipe: Recipe, kind: str, micro_batch: int,
             checkpointing: bool, overhead: float, device: str = "cpu",
             cache: float = 0.0) -> Estimate:
    if isinstance(shape, Census):  # counted on the meta device, not modelled
        return census_estimate(shape, recipe, kind, micro_batch, checkpointing, overhead,
                               device)
    trainable = trainable_params(shape, recipe, kind)
    return Estimate(kind=kind, micro_batch=micro_batch, checkpointing=checkpointing,
                    weights=weight_bytes(shape, recipe, kind, element_bytes(recipe, device)),
                    gradients=trainable * FP32,
                    optimizer=trainable * OPTIMIZER_BYTES[recipe.train.optimizer],
                    activations=activation_bytes(shape, recipe, kind, micro_batch,
                                                 checkpointing, device),
                    evaluation=evaluation_bytes(shape, recipe, kind, trainable, device),
                    overhead=overhead, trainable=trainable, cache=cache)


# Calibrated, not derived: fitted on SST-2 with all-MiniLM-L6-v2 (the one dataset and model
# the planner was tuned on; its error on others is in the README). RSS per byte of data
# file: the Python strings while reading, the Arrow tables, three int64 token columns.
SST2_FITTED_DATA_RSS_PER_FILE_BYTE = 13
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the dynamic mmap threshold never rises above
# it, so every larger block is its own mapping, returned to the system when freed
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
# Calibrated on SST-2 / MiniLM LoRA, full and head runs (fp32 and bf16, 64 to 128 tokens):
# peak RSS above the live activations, from glibc's reuse of freed blocks; with RSS pinned
# to live tensors (a 128 KiB mmap threshold) the slack vanished but steps took 2.3x longer
SST2_FITTED_CPU_HEAP_SLACK = 0.4
# Calibrated on MiniLM (saved-tensor census): DoRA keeps about two more output-sized tensors
# per adapted linear, plus the W + BA whose column norms it takes
MINILM_FITTED_DORA_OUTPUTS_PER_LINEAR = 2


def data_bytes(recipe: Recipe) -> float:
    """What the recipe's data files take in memory once read and tokenized (0 for a hub
    dataset, which is not on disk to measure)."""
    from pathlib import Path

    from peftlab.config import resolve_data_path
    total = 0
    for value in (recipe.data.train, recipe.data.validation, recipe.data.test):
        path = Path(resolve_data_path(value, recipe)) if value else None
        if path is not None and path.exists():
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            total += sum(f.stat().st_size for f in files)
    return total * SST2_FITTED_DATA_RSS_PER_FILE_BYTE


def runtime_overhead_bytes() -> float:
    """RSS of this process once the training stack is imported: the fixed cost of any run on
    CPU (Python, torch, transformers, peft, accelerate, datasets, evaluate), measured here,
    not assumed, by importing what `peftlab train` imports."""
    import peftlab.train  # noqa: F401  imported for its memory, as a run does
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    return 0.0


def overhead_bytes(recipe: Recipe, device: str, shape=None) -> float:
    """CPU: the Python stack and the data in memory (both count in RSS; a census knows its
    task's data, else the text rule); GPU: nothing, since peak allocated memory counts only
    tensors."""
    if device != "cpu":
        return 0.0
    data = shape.spec.data_bytes if isinstance(shape, Census) else data_bytes(recipe)
    return runtime_overhead_bytes() + data


def element_bytes(recipe: Recipe, device: str) -> int:
    """Bytes per activation value: 2 where the run would use bf16/fp16 autocast."""
    from peftlab.hardware import cpu_has_native_bf16
    precision = recipe.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" or cpu_has_native_bf16() else "no"
    return FP32 if precision == "no" else 2


def frozen_cache_terms(recipe: Recipe, shape: ModelShape, kinds, device: str) -> dict:
    """Per strategy, the features train.cache_frozen would keep in memory. They depend on the
    data's token lengths, so they are counted only when the training file is on disk."""
    from pathlib import Path

    from peftlab.config import resolve_data_path
    train = Path(resolve_data_path(recipe.data.train, recipe)) if recipe.data.train else None
    if train is None or not train.exists() or isinstance(shape, Census):
        return {}  # a census's tasks keep no frozen cache
    precision = "no" if element_bytes(recipe, device) == FP32 else "bf16"
    task = task_module(recipe.model.task)
    return {kind: task.frozen_cache_bytes(recipe, kind, shape.hidden, precision)
            for kind in kinds}


def plan(recipe: Recipe, device: str, kinds=PLAN_KINDS, shape: ModelShape | None = None,
         overhead: float | None = None, cache: dict | None = None) -> list[Estimate]:
    """One estimate per strategy at the recipe's micro-batch and checkpointing setting."""
    shape = shape or shape_of(recipe)
    if overhead is None:
        overhead = overhead_bytes(recipe, device, shape)
    if cache is None:
        cache = frozen_cache_terms(recipe, shape, kinds, device)
    return [estimate(shape, recipe, kind, recipe.train.batch_size,
                     recipe.train.gradient_checkpointing, overhead, device,
                     cache.get(kind, 0.0)) for kind in kinds if plannable(shape, kind)]


def planned_inputs(recipe: Recipe, shape: ModelShape | Census) -> str:
    """What one example is, for the plan's header: its tokens, or the census's inputs."""
    return shape.spec.describe if isinstance(shape, Census) else \
        f"{recipe.model.max_length} tokens"


def plannable(shape: ModelShape | Census, kind: str) -> bool:
    """qlora needs linear layers to quantize (a ResNet has none); everything else plans."""
    return shape.plannable(kind) if isinstance(shape, Census) else True


def recommend(recipe: Recipe, shape: ModelShape, budget: float, overhead: float,
              order=("full", "lora", "qlora", "head"), device: str = "cpu",
              cache: dict | None = None) -> Estimate | None:
    """The recipe's own strategy if it fits at some micro-batch, else the first of `order`
    that does: the largest micro-batch without checkpointing, then with it."""
    kinds = [recipe.strategy.kind] + [k for k in order if k != recipe.strategy.kind]
    for kind in kinds:
        if kind not in PLAN_KINDS or not plannable(shape, kind):
            continue
        for checkpointing in (False, True):
            micro = recipe.train.batch_size
            while micro >= 1:
                guess = estimate(shape, recipe, kind, micro, checkpointing, overhead, device,
                                 (cache or {}).get(kind, 0.0))
                if guess.total <= budget:
                    return guess
                micro //= 2
    return None


def free_memory_bytes(device: str) -> float:
    """What a run could still take: free CUDA memory, or the OS's MemAvailable plus what this
    process already holds (the planner's CPU overhead term counts that part)."""
    import torch
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo", encoding="utf-8") as info:
        available = next(int(line.split()[1]) * 1024 for line in info
                         if line.startswith("MemAvailable:"))
    return available + runtime_overhead_bytes()


def fit_micro_batch(recipe: Recipe, device: str, budget: float | None = None) -> int:
    """The largest micro-batch, halving from the recipe's, whose estimate fits the budget."""
    shape = shape_of(recipe)
    overhead = overhead_bytes(recipe, device, shape)
    budget = free_memory_bytes(device) if budget is None else budget
    kind, micro = recipe.strategy.kind, recipe.train.batch_size
    while micro > 1 and estimate(shape, recipe, kind, micro, recipe.train.gradient_checkpointing,
                                 overhead, device).total > budget:
        micro //= 2
    return micro


def fit_batch_to_memory(recipe: Recipe, device: str, say) -> None:
    """train.auto_batch_size: a smaller micro-batch and more accumulation, same effective
    batch, when the planner says the recipe's micro-batch would not fit free memory."""
    cfg = recipe.train
    if recipe.strategy.kind not in PLAN_KINDS:
        say(f"train.auto_batch_size: cannot plan strategy '{recipe.strategy.kind}'; "
            f"keeping micro-batch {cfg.batch_size}")
        return
    micro = fit_micro_batch(recipe, device)
    if micro < cfg.batch_size:
        cfg.grad_accum *= cfg.batch_size // micro
        cfg.batch_size = micro
    say(f"train.auto_batch_size: micro-batch {cfg.batch_size} x {cfg.grad_accum} accumulation "
        f"fits free memory")


def parse_size(text: str) -> float:
    """'8GiB', '16GB', '512MiB', '1.5g' -> bytes (GB read as GiB, as GPU makers mean it)."""
    import re
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        from peftlab.errors import PeftlabError
        raise PeftlabError(f"--budget: '{text}' is not a size such as 8GiB or 512MiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2)]
    return float(match.group(1)) * scale


def format_plan(estimates: list[Estimate], budget: float | None) -> str:
    """The plan as a table; a frozen-cache column only where some strategy would cache."""
    cached = any(e.cache for e in estimates)
    header = ("| strategy | trainable | weights | gradients | optimizer | activations | "
              "evaluation | " + ("frozen cache | " if cached else "") + "overhead | total |" +
              (" fits |" if budget else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for e in estimates:
        values = (e.weights, e.gradients, e.optimizer, e.activations, e.evaluation) + \
            ((e.cache,) if cached else ()) + (e.overhead, e.total)
        cells = [e.kind, f"{e.trainable:,}"] + [f"{v / MB:,.0f} MB" for v in values]
        if budget:
            cells.append("yes" if e.total <= budget else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
