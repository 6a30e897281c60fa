"""Causal-LM cross-entropy without the tokens x vocabulary logits.

A plain loss materialises fp32 logits for every position, then their log-softmax and its
gradient: for Llama-3 (128k vocabulary) one 2,048-token row is 1 GB of logits, three times
over, often the peak of a QLoRA run. Here the model runs as usual up to its output head; the
head's input is taken instead of its output, only the positions that have a target
(labels != -100) are kept, and the head plus cross-entropy run over chunks of those. Each
chunk is checkpointed: forward keeps only its per-token losses, backward recomputes its
logits, so at most one chunk of logits is alive at any moment, in training and evaluation.

The model is still called through its own forward (and DDP's), so gradient synchronisation,
peft wrappers and autocast work as before; a forward pre-hook on the output head swaps the
head's input for an empty slice and keeps the real one. Models whose forward changes the
logits after the head (Gemma's soft-capping, Cohere's logit scale) take the plain path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from peftlab.batches import IGNORE

# auto chunk size: about 16M logits (64 MB in fp32) per chunk, whatever the vocabulary. A
# chunk's backward holds about four times that (bf16 logits, their fp32 copy, log-softmax,
# its gradient); the head's GEMM over ~110 tokens of a 152k vocabulary is still large
AUTO_CHUNK_LOGITS = 2**24
# config attributes that mean the forward transforms logits after the head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunk_tokens(vocab: int, requested: int = 0) -> int:
    """Target tokens per chunk: as requested, else ~AUTO_CHUNK_LOGITS logits a chunk."""
    return requested if requested > 0 else max(1, AUTO_CHUNK_LOGITS // max(vocab, 1))


def logits_bytes(tokens: int, vocab: int, chunked: bool = True, chunk: int = 0,
                 training: bool = True) -> float:
    """The planner's logits term: the fp32 logits alive at once, with their log-softmax and
    (training) its gradient; one chunk's worth when the loss is chunked."""
    rows = min(tokens, chunk_tokens(vocab, chunk)) if chunked else tokens
    return rows * vocab * 4 * (3 if training else 2)


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head the chunked loss can call in place of the model's own logits, or None
    when the model's logits are not just head(hidden)."""
    inner = _unwrapped(model)
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS):
        return None
    try:
        return inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def _head_input_captured(head: nn.Module):
    """Inside it, `head` receives an empty slice of its input and the full input is kept."""
    kept: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        kept["hidden"] = args[0]
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(keep_input)
    try:
        yield kept
    finally:
        handle.remove()


def _chunk_losses(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def target_losses(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                  chunk: int) -> torch.Tensor:
    """Cross-entropy of each (hidden row, label), chunk by chunk; recomputed in backward."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk):
        piece_hidden, piece_labels = hidden[start:start + chunk], labels[start:start + chunk]
        if torch.is_grad_enabled():
            # the head has no randomness, so no RNG state needs saving for the recompute
            pieces.append(checkpoint(_chunk_losses, head, piece_hidden, piece_labels,
                                     use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_chunk_losses(head, piece_hidden, piece_labels))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _full_logits_losses(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                       reduction="none")


def token_losses(model: nn.Module, batch: dict, chunked: bool = True,
                 chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (summed target-token loss, target-token count), next-token shifted.

    No KV cache in training: it is never read, and with one transformers would not keep
    packed examples apart."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"][:, 1:]
    targets = labels != IGNORE
    head = output_head(model) if chunked else None
    if head is None:
        return _full_logits_losses(model, inputs, labels).sum(dim=1), targets.sum(dim=1)
    with _head_input_captured(head) as kept:
        model(**inputs, use_cache=False)
    hidden = kept["hidden"][:, :-1]
    chunk = chunk_tokens(_unwrapped(model).config.vocab_size, chunk)
    rows = targets.nonzero()[:, 0]
    if rows.numel():
        losses = target_losses(head, hidden[targets], labels[targets], chunk)
    else:
        # no target here (an ignored batch that evens out processes): a zero loss that still
        # reaches every weight, as the plain logits do, so every DDP gradient hook fires
        rows = rows.new_zeros(1)
        losses = target_losses(head, hidden[:1, 0], labels.new_zeros(1), chunk) * 0
    sums = torch.zeros(labels.shape[0], device=losses.device, dtype=losses.dtype)
    return sums.index_add(0, rows, losses), targets.sum(dim=1)
