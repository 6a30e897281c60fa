"""A model's shape without its weights: parameter counts per part, LoRA targets, FLOPs.

The model is built on the meta device from its config alone, so the counts are exact for any
architecture transformers knows (BERT to Llama-3-8B) and cost no memory or download beyond
config.json. The memory planner and the benchmark's FLOP utilisation both read this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftlab.config import Recipe


@dataclass
class ModelShape:
    """What memory and compute depend on; numbers are parameter counts unless named."""

    hidden: int
    layers: int
    heads: int
    kv_dim: int  # width of K (and V): heads x head_dim, smaller with grouped-query attention
    intermediate: int
    vocab: int
    gated_mlp: bool  # SwiGLU (Llama, Qwen2, Mistral): three MLP matrices and a gate product
    total: int
    head: int  # classifier / score head (a new head that always trains)
    layer_linear: int  # matmul weights of one transformer layer
    layer_params: int  # every parameter of one transformer layer (norms, biases too)
    below_layers: int  # embeddings and their norm: frozen by `freeze` with the bottom layers
    lora_linear: list[tuple[int, int]] = field(default_factory=list)  # (in, out) per target
    lm_head: int = 0  # output projection over the vocabulary (tied or not)
    attention_dropout: float = 0.0  # > 0 makes CPU SDPA fall back to a materialized s x s


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def load_config(recipe: Recipe):
    from transformers import AutoConfig

    from peftlab.models import hub_kwargs, resolve_model_path
    return AutoConfig.from_pretrained(resolve_model_path(recipe.model.name, recipe), **hub_kwargs(recipe))


def shape_of(recipe: Recipe, config=None):
    """Count parameters on a meta-device model built from the recipe's model config (a
    classifier head sized by data.label_names, or 2 labels when they come from the data).
    A task that sizes its model by a census of saved tensors gets a census.Census instead."""
    from peftlab.census import census_of
    from peftlab.strategies import default_target_modules, embedding_params, head_names, layer_stack
    from peftlab.tasks import task_module
    config = config or load_config(recipe)
    task = task_module(recipe.model.task)
    spec = task.plan_census(config, recipe)
    if spec is not None:
        return census_of(recipe, config, spec)
    model = task.meta_model(config, recipe)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    head_dim = _first(config, "head_dim", default=hidden // heads)
    kv_heads = _first(config, "num_key_value_heads", default=heads)
    layers = layer_stack(model)
    layer_linear = sum(m.weight.numel() for m in layers[0].modules() if _is_linear(m))
    heads_params = sum(p.numel() for name in (head_names(model) if task.NEW_HEAD else [])
                       for p in getattr(model, name).parameters())
    output = None if task.NEW_HEAD else model.get_output_embeddings()
    wanted = recipe.strategy.target_modules or default_target_modules(model)
    targets = [_fans(m) for name, m in model.named_modules()
               if _is_linear(m) and _matches(wanted, name)]
    return ModelShape(
        hidden=hidden, layers=len(layers), heads=heads, kv_dim=kv_heads * head_dim,
        intermediate=_first(config, "intermediate_size", "n_inner", default=4 * hidden) or
        4 * hidden, vocab=config.vocab_size, gated_mlp=hasattr(layers[0], "mlp") and
        hasattr(layers[0].mlp, "gate_proj"),
        total=sum(p.numel() for p in model.parameters()),
        head=heads_params, layer_linear=layer_linear, lora_linear=targets,
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        below_layers=sum(p.numel() for p in embedding_params(model)),
        lm_head=output.weight.numel() if output is not None else 0,
        attention_dropout=_first(config, "attention_probs_dropout_prob", "attention_dropout",
                                 "attn_pdrop", default=0.0) or 0.0)



def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer with its weight transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _fans(module: nn.Module) -> tuple[int, int]:
    """(in, out) features: nn.Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    rows, cols = module.weight.shape
    return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)


def _matches(targets: list[str], name: str) -> bool:
    """peft's rule for a list of target names: the full name, or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_params(shape: ModelShape, rank: int, dora: bool) -> int:
    """A (r x in) and B (out x r) per target; DoRA adds one magnitude per output feature."""
    return sum(rank * (fan_in + fan_out) + (fan_out if dora else 0)
               for fan_in, fan_out in shape.lora_linear)


def matmul_params(shape: ModelShape) -> int:
    """Weights that take part in a matmul per token: layers, head, output projection."""
    return shape.layers * shape.layer_linear + shape.head + shape.lm_head


def training_flops_per_token(shape: ModelShape, seq_len: int, trainable_layers: int,
                             weight_grads: bool, lora_rank: int = 0) -> float:
    """Forward 2 FLOPs per weight; backward 2 for input gradients in every layer above the
    lowest trainable one, and 2 more per weight that trains. Attention scores and values add
    4 x seq x hidden per layer forward (twice that backward)."""
    dense = matmul_params(shape)
    attention = 4 * seq_len * shape.hidden
    forward = 2 * dense + shape.layers * attention
    backward_layers = trainable_layers / max(shape.layers, 1)
    backward = backward_layers * (2 * shape.layers * shape.layer_linear +
                                  2 * shape.layers * attention) + 2 * (shape.head + shape.lm_head)
    if weight_grads:
        backward += 2 * (trainable_layers * shape.layer_linear + shape.head + shape.lm_head)
    adapters = lora_params(shape, lora_rank, False) if lora_rank else 0
    return forward + backward + 6 * adapters
