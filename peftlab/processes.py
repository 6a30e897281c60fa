"""What several processes (`accelerate launch`) need beyond one: DDP told about parameters
that start frozen, and an end that every process reaches together."""

from __future__ import annotations

import gc

from accelerate.utils import DistributedDataParallelKwargs


def ddp_kwargs(kind: str) -> list:
    """gradual: groups open after DDP wrapped the model, so every group is registered (all
    trainable at prepare) and each step's frozen ones are found unused instead of awaited:
    without this, 2 processes trained layer 1 differently (1.96e-3 of a 2.08e-3 update)."""
    return [DistributedDataParallelKwargs(find_unused_parameters=True)] \
        if kind == "gradual" else []


def finish_together(accelerator) -> None:
    """End the run (trackers, process group) once the DDP wrapper is gone, on every process.

    Accelerate's end_training destroys the process group; a DDP reducer freed after that, or
    after the peer process had exited, joined gloo threads that never finished (seen as a
    2-process run that wrote all its files and never exited). The caller drops its own
    references to the prepared model first."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.free_memory()  # accelerate's own references to the prepared objects
        gc.collect()
        accelerator.wait_for_everyone()
    accelerator.end_training()
