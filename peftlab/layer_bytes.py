"""Per-token, per-layer bytes a training step keeps for backward: the census-derived terms
of the memory planner for transformer layers and their LoRA adapters (peftlab/memory.py
sums them into a peak; tests/test_memory.py counts the real saved tensors against them)."""

from __future__ import annotations

from peftlab.config import Recipe
from peftlab.model_shape import ModelShape
from peftlab.quantization import quantization_kind

FP32 = 4
MASK = 1  # a bool dropout mask (peftlab/fast_dropout.py), per element


def layer_activation_bytes(shape: ModelShape, seq_len: int, element: int = FP32,
                           device: str = "cpu", fp32_norms: bool = True) -> float:
    """Bytes one layer keeps for backward per token, from a census of the tensors autograd
    saves (tests/test_memory.py counts them with saved-tensor hooks, in fp32 and in bf16).

    fp32. Encoder (post-norm BERT, GELU): 8h + 2 x intermediate floats (the linear inputs,
    Q/K/V in two layouts, the context, residual sums, norm outputs, the MLP's pre- and
    post-GELU) and the two hidden dropouts' 1-byte masks (2h bytes in every precision,
    peftlab/fast_dropout.py). Decoder (pre-norm, SwiGLU): 7h + K/V + 4 x intermediate.
    With attention dropout on CPU, attention runs peftlab's short path
    (peftlab/fast_attention.py), which keeps per token heads x seq of the fp32 softmax
    output, the dropped probabilities in the run's dtype and their 1-byte mask; CUDA kernels
    apply dropout without materializing them.

    bf16 autocast (element 2) does not halve all of it. What the matmuls save is bf16
    (encoder 8h + 2 x intermediate beside the masks, decoder 7h + K/V + 4 x intermediate),
    but autocast keeps norms in fp32, so the residual stream they read stays fp32: ~3h per
    encoder layer (two LayerNorm inputs, and the embedding norm's share) and 5h per decoder
    layer (RMSNorm upcasts and residual sums). A base stored in bf16 (`fp32_norms` False: a
    frozen LoRA, DoRA or head base) has bf16 norm weights, and the stream is bf16 too: the
    encoder keeps no fp32 stream, the decoder only its two RMSNorms' fp32 upcasts (2h) and
    4h of inputs (no base linear keeps its input for a weight gradient). Q, K and V stay
    bf16 (torch's SDPA math path upcast them to fp32; the short path does not).
    """
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    scores = _dropout_scores_bytes(shape, seq_len, element, device)
    if element == FP32:
        if shape.gated_mlp:
            return (7 * h + 2 * kv + 4 * inter) * FP32 + scores
        return (8 * h + 2 * inter) * FP32 + 2 * h * MASK + scores
    if shape.gated_mlp and not fp32_norms:
        # frozen bf16 base: no linear keeps its input for a weight gradient, so what stays
        # is one input per distinct adapter input (q/k/v share one, gate/up one), the rotated
        # Q, K, V and the attention output, the MLP's four, and the RMSNorms' fp32 upcasts
        return (4 * h + 2 * kv + 4 * inter) * element + 2 * h * FP32 + scores
    if shape.gated_mlp:
        return (7 * h + 2 * kv + 4 * inter) * element + 5 * h * FP32 + scores
    stream = 3 * h * FP32 if fp32_norms else 0  # bf16 norms: the sums are in the 8h
    return (8 * h + 2 * inter) * element + 2 * h * MASK + stream + scores


def _dropout_scores_bytes(shape: ModelShape, seq_len: int, element: int,
                          device: str) -> float:
    """Per token and layer, what fast_attention.py keeps of the heads x seq scores: the fp32
    softmax output, the dropped probabilities (run dtype) and their mask; nothing without
    attention dropout or off CPU."""
    if not (shape.attention_dropout > 0 and device == "cpu"):
        return 0.0
    return shape.heads * seq_len * (FP32 + element + MASK)


def attention_heap_bytes(shape: ModelShape, seq_len: int, element: int = FP32,
                         device: str = "cpu") -> float:
    """Per token and layer, what a CPU run's peak RSS holds beyond the saved tensors when
    attention dropout is on. Calibrated, not counted: torch's SDPA math path saved 3 fp32
    heads x seq matrices and (under bf16) fp32 Q, K, V; peftlab/fast_attention.py saves the
    smaller set above, yet peaks stayed where they were (same job, both paths in one
    invocation: 1,628 against 1,617 MB, benchmarks/results/fast_attention_ab_cpu.md; AG News
    at 128 tokens: benchmarks/results/planner_error_cpu_saved_terms_only.md, where dropping
    this term put the planner 17-25% under). Glibc keeps the freed seq x seq transients of
    each layer's attention beside the rest, so the planner's RSS terms keep the math path's
    set and its saved-tensor terms (the census tests) the real one."""
    saved = _dropout_scores_bytes(shape, seq_len, element, device)
    if not saved:
        return 0.0
    math_path = 3 * shape.heads * seq_len * FP32
    upcast = 3 * shape.hidden * (FP32 - element) if not shape.gated_mlp else 0
    return math_path - saved + upcast


def adapter_input_bytes(shape: ModelShape, recipe: Recipe, kind: str, element: int) -> float:
    """Per token and layer, what LoRA adapters keep beyond the layer's own inputs (counted
    in tests/test_memory.py): the thin (tokens x r) product of each, plus what happens to
    the input. peftlab's fused layer (lora on a plain base) keeps the input itself and, with
    dropout, a 1-byte mask. peft's own layer (qlora's 4-bit base) runs dropout on an fp32
    copy of the input and keeps its fp32 noise: 4 bytes an element, as the census on a tiny
    Llama measures (tests/test_memory.py, fp32 and bf16). DoRA's calibrated term below
    stands for its own path."""
    if kind not in ("lora", "qlora") or not shape.lora_linear:
        return 0.0
    layers = max(shape.layers, 1)
    fan_in = sum(i for i, _ in shape.lora_linear) / layers
    thin = len(shape.lora_linear) / layers * recipe.strategy.lora_r * element
    dropout = recipe.strategy.lora_dropout > 0
    if quantization_kind(recipe, kind) == "none":
        return fan_in * (MASK if dropout else 0) + thin
    return fan_in * (FP32 if dropout else 0) + thin
