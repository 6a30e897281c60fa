"""Chunked causal-LM loss: the same losses and gradients as the plain logits, without them."""

import pytest
import torch
from conftest import write_recipe
from test_sft import alpaca_file
from transformers import AutoModelForCausalLM

from peftlab.batches import IGNORE
from peftlab.config import load_recipe
from peftlab.lm_loss import output_head, token_losses
from peftlab.train import run


def _batch(vocab: int) -> dict:
    """Two padded rows with prompt tokens ignored, and a packed row (restarting positions)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[1, 9:] = IGNORE  # padding of the shorter row
    ids[1, 9:] = 0
    position_ids = torch.arange(12).repeat(3, 1)
    position_ids[2, 6:] = torch.arange(6)  # a second example packed into row 2
    labels[2, 6] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def _losses_and_grads(model, batch, chunked: bool, chunk: int = 0, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks on both paths (GPT-2 has dropout)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        sums, counts = token_losses(model, batch, chunked=chunked, chunk=chunk)
    sums.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums.detach(), counts, grads


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_chunked_loss_equals_plain_loss_and_gradients_fp32(arch, request):
    """Full fine-tuning (so the tied head/embedding weight trains too), chunks of 5 target
    tokens (several chunks, the last one short): losses to 1e-5 and every gradient equal."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch))
    model.train()
    batch = _batch(model.config.vocab_size)
    plain, plain_counts, plain_grads = _losses_and_grads(model, batch, chunked=False)
    chunked, counts, grads = _losses_and_grads(model, batch, chunked=True, chunk=5)
    assert torch.equal(counts, plain_counts) and int(counts.sum()) > 10
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_loss_equals_plain_loss_under_lora_and_bf16(tiny_llama):
    """The path a bf16 LoRA run takes: peft wrappers, autocast; the adapters' gradients
    agree to bf16 rounding."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                      init_lora_weights=False))
    model.train()
    batch = _batch(model.config.vocab_size)
    plain, _, plain_grads = _losses_and_grads(model, batch, chunked=False, bf16=True)
    chunked, _, grads = _losses_and_grads(model, batch, chunked=True, chunk=4, bf16=True)
    torch.testing.assert_close(chunked, plain, rtol=2e-2, atol=2e-2)
    assert grads.keys() == plain_grads.keys() and all("lora_" in n for n in grads)
    for name, grad in grads.items():
        assert (grad - plain_grads[name]).norm() <= 0.05 * plain_grads[name].norm() + 1e-6, name


def test_chunked_loss_never_makes_the_whole_logits(tiny_llama):
    """Only target positions reach the head, at most `chunk` rows at a time, in the forward
    and in the recomputation during backward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = _batch(model.config.vocab_size)
    rows_seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows_seen.append(out.shape[:-1].numel()))
    try:
        sums, counts = token_losses(model, batch, chunked=True, chunk=4)
        sums.sum().backward()
    finally:
        handle.remove()
    targets = int(counts.sum())
    assert max(rows_seen) == 4 and sum(rows_seen) == 2 * targets  # forward + recompute
    with torch.inference_mode():
        rows_seen.clear()
        handle = model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: rows_seen.append(out.shape[:-1].numel()))
        token_losses(model, batch, chunked=True, chunk=4)
        handle.remove()
    assert sum(rows_seen) == targets  # evaluation: once, no recompute


def test_models_that_transform_logits_take_the_plain_path(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # as Gemma-2 does after the head
    assert output_head(model) is None
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        sums, _ = token_losses(model, batch, chunked=True)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.isfinite(sums).all() and logits.shape[1] == 12  # full logits were made


def test_runs_with_and_without_chunking_are_equal(tmp_path, tiny_llama):
    """A whole SFT run (fp32, LoRA, accumulation over examples of different lengths): the
    loss curve, the evaluations and the final metrics equal the plain-logits run."""
    results = []
    for chunked in (True, False):
        recipe = load_recipe(write_recipe(
            tmp_path / f"r{chunked}.yaml", tiny_llama, alpaca_file(tmp_path),
            model={"task": "causal_lm"}, eval={"max_new_tokens": 1},
            train={"epochs": 1, "batch_size": 4, "grad_accum": 2, "mixed_precision": "no",
                   "log_every_steps": 1, "eval_every_steps": 4, "chunked_lm_loss": chunked,
                   "lm_loss_chunk_tokens": 7}))
        results.append(run(recipe, output_dir=str(tmp_path / f"run{chunked}")))
    chunked_run, plain_run = results
    curve = [p["loss"] for p in chunked_run["summary"]["loss_history"]]
    assert len(curve) >= 5
    assert curve == pytest.approx([p["loss"] for p in plain_run["summary"]["loss_history"]],
                                  abs=1e-5)
    for split in ("validation", "test"):
        assert chunked_run["metrics"][split]["loss"] == pytest.approx(
            plain_run["metrics"][split]["loss"], abs=1e-5)


def test_a_batch_without_targets_still_reaches_every_weight(tiny_llama):
    """The ignored examples that even out processes: zero loss, and a graph to every weight
    (DDP waits for each gradient hook; a detached zero would fail backward)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = _batch(model.config.vocab_size)
    batch["labels"][:] = IGNORE
    sums, counts = token_losses(model, batch, chunked=True, chunk=4)
    assert int(counts.sum()) == 0 and float(sums.sum()) == 0.0
    sums.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
