"""One autograd step for the adapted layers that read the same input: Q, K and V of attention.

An attention block feeds one hidden-state tensor to its query, key and value projections.
Three separate fused LoRA layers (peftlab/fused_lora.py) each make their own thin product
x A^T in forward, and in backward their own input gradient, which autograd then sums over
the three branches (two more passes over the full tokens x features tensor), and their own
A gradient. Those thin GEMMs (r = 8 columns) cost about a fixed dispatch and a cold pass over
x each, not their FLOPs: on SST-2 / MiniLM they were a quarter of a bf16 LoRA step.

Here the layers' A matrices are stacked: one thin product for all of them, the input gradient
accumulates every branch into one buffer (one GEMM per base weight plus one thin GEMM), and
one GEMM gives all the A gradients. The frozen base GEMMs, the B products and their
gradients stay per layer, so nothing is copied but the stacked A (ranks x in_features). The
values are those of the separate layers up to summation order. With LoRA dropout each layer
draws its own mask on x, so the stacked product does not apply: fused_lora.py groups only
layers without dropout.
"""

from __future__ import annotations

import torch


class FusedLoraGroup(torch.autograd.Function):
    """Outputs y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T for n layers with frozen W_i, b_i.

    Inputs after (x, scalings, dtype): the n weights, the n biases (None allowed), the n A
    and the n B matrices. The thin product is kept transposed (ranks x tokens), so each
    layer's rows are contiguous and its gradient rows are written in place."""

    @staticmethod
    def forward(ctx, x, scalings: tuple[float, ...], dtype: torch.dtype, *tensors):
        n = len(scalings)
        weights, biases, lora_as, lora_bs = (tensors[i * n:(i + 1) * n] for i in range(4))
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        weights = [weight.to(dtype) for weight in weights]
        lora_bs = [lora_b.to(dtype) for lora_b in lora_bs]
        stacked_a = torch.cat([lora_a.to(dtype) for lora_a in lora_as])
        ranks = [lora_a.shape[0] for lora_a in lora_as]
        thin_t = torch.mm(stacked_a, flat.t())
        rows = thin_t.split(ranks)
        for row, scaling in zip(rows, scalings):
            row.mul_(scaling)
        outs = []
        for weight, bias, lora_b, row in zip(weights, biases, lora_bs, rows):
            out = (torch.mm(flat, weight.t()) if bias is None
                   else torch.addmm(bias.to(dtype), flat, weight.t()))
            out.addmm_(row.t(), lora_b.t())
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.save_for_backward(flat, stacked_a, thin_t, *weights, *lora_bs)
        ctx.set_materialize_grads(False)  # an unused output sends None, not a zero tensor
        ctx.scalings, ctx.ranks = scalings, ranks
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.scalings)
        flat, stacked_a, thin_t, *rest = ctx.saved_tensors
        weights, lora_bs = rest[:n], rest[n:]
        grads = [None if grad is None else grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
                 for grad in grads]
        grad_thin_t = flat.new_empty(thin_t.shape)
        for grad, lora_b, row, scaling in zip(grads, lora_bs, grad_thin_t.split(ctx.ranks),
                                              ctx.scalings):
            if grad is None:
                row.zero_()
            else:
                torch.mm(lora_b.t(), grad.t(), out=row).mul_(scaling)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_thin_t.t(), stacked_a)
            for grad, weight in zip(grads, weights):
                if grad is not None:
                    grad_x.addmm_(grad, weight)
            grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
        a_needed = ctx.needs_input_grad[3 + 2 * n:3 + 3 * n]
        grad_as = [None] * n
        if any(a_needed):
            grad_as = list(torch.mm(grad_thin_t, flat).split(ctx.ranks))
        grad_bs = [None if grad is None or not needed else torch.mm(grad.t(), row.t())
                   for grad, row, needed in zip(grads, thin_t.split(ctx.ranks),
                                                ctx.needs_input_grad[3 + 3 * n:])]
        return (grad_x, None, None, *[None] * (2 * n), *grad_as, *grad_bs)
