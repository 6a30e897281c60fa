"""What ends a run early, and how it ends: Ctrl-C or SIGTERM (save, then exit), a loss that
is no longer finite (stop before it reaches a checkpoint), and running out of memory (say
which knobs help instead of a CUDA traceback)."""

from __future__ import annotations

import signal
import threading

import torch

from peftlab.errors import PeftlabError


class StopRequests:
    """Turns the first SIGINT/SIGTERM into a flag the loop reads between optimizer steps, so
    the checkpoint it saves is of a finished step; a second Ctrl-C kills as usual.
    SIGTERM is what schedulers (SLURM preemption, Kubernetes) send before killing a job."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopRequests:  # noqa: PYI034
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self, accelerator) -> bool:
        """True on every process when any process was signalled: all must stop at the
        same step or the others would wait forever in the next all-reduce."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0


def nonfinite_error(first_step: int, last_step: int, last_checkpoint) -> PeftlabError:
    where = (f"at step {last_step}" if first_step >= last_step
             else f"between steps {first_step} and {last_step}")
    return PeftlabError(
        f"training loss or gradient became nan/inf {where}; stopped without saving it. "
        f"Last good checkpoint: {last_checkpoint or 'none'}. Lower train.lr, keep "
        f"train.max_grad_norm > 0, or use bf16 instead of fp16")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError that says so."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text
                                              or "out of memory" in text.lower())


def out_of_memory_error(recipe_source: str, device, step: int, micro_batch: int,
                        last_checkpoint) -> PeftlabError:
    return PeftlabError(
        f"out of memory on {device} at step {step + 1} (micro-batch {micro_batch}). Run "
        f"`peftlab plan {recipe_source or 'RECIPE'}` to see what fits, then lower "
        f"train.batch_size (raise train.grad_accum to keep the effective batch) or "
        f"eval.batch_size, set "
        f"train.gradient_checkpointing=true, model.max_length lower, or strategy.kind=qlora. "
        f"Last checkpoint: {last_checkpoint or 'none'}")
