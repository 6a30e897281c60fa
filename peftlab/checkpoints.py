"""Checkpoints of a run: written atomically, the newest K kept, loaded to resume bit-exactly.

<run>/checkpoints/step-00000040/ holds what `accelerator.save_state` writes (the weights
that can change, as safetensors; optimizer; scheduler; each process's RNG states) plus
`loop_state.json` (step, epoch, micro-batches done in the epoch, best metric, histories) and
`best.safetensors` (the best weights so far, restored at the end of the run). A checkpoint
is written under a `.tmp` name and renamed when complete, so a crash or a full disk while
writing leaves the previous checkpoint whole and `latest` never points at a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftlab.config import Recipe, read_yaml, resolved_recipe_dict
from peftlab.errors import PeftlabError

CHECKPOINTS = "checkpoints"
LOOP_STATE = "loop_state.json"
BEST_WEIGHTS = "best.safetensors"
MODEL_WEIGHTS = "model.safetensors"  # the name accelerate gives the first model's weights
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    """Everything the training loop carries from one step to the next, besides the
    model, optimizer, scheduler and RNG (which accelerate saves)."""
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on (this process)
    stopped: bool = False  # early stopping fired or the last step was reached
    samples: int = 0
    padded_tokens: int = 0
    # per process: [summed loss, items] since the last log line, real tokens seen; each
    # process gets its own back, so the first loss logged after a resume is exact too
    counters: list[list[float]] = field(default_factory=list)
    best: float | None = None
    best_step: int = 0
    stale: int = 0  # evaluations without improvement, for early stopping
    train_seconds: float = 0.0  # spent by earlier processes of this run (resumed runs)
    processes: int = 1
    history: list[dict] = field(default_factory=list)
    loss_history: list[dict] = field(default_factory=list)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` folders are not listed)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / LOOP_STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """`latest` or a checkpoint folder -> the folder, or a one-line error."""
    if which == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise PeftlabError(f"{run_dir / CHECKPOINTS}: no checkpoint to resume from")
        return found[-1]
    path = Path(which)
    if not path.is_dir():
        raise PeftlabError(f"--resume {which}: no such checkpoint folder")
    if not (path / LOOP_STATE).is_file():
        raise PeftlabError(f"--resume {which}: not a complete peftlab checkpoint "
                           f"(no {LOOP_STATE})")
    return path


def check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """A run resumes only with the recipe it started with and only if it has not finished:
    another lr or batch size would silently make a different run under the same name."""
    if (run_dir / "summary.json").is_file():
        raise PeftlabError(f"{run_dir}: the run finished already (summary.json exists); "
                           f"nothing to resume")
    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        raise PeftlabError(f"{run_dir}: not a peftlab run folder (no recipe.yaml)")
    saved = read_yaml(saved_path) or {}
    for section, values in resolved_recipe_dict(recipe).items():
        if section == "output":
            continue
        for key, value in values.items():
            before = (saved.get(section) or {}).get(key)
            if before != value:
                raise PeftlabError(f"{saved_path}: {section}.{key} was {before!r} but the "
                                   f"recipe now says {value!r}; resume with the run's own "
                                   f"recipe ({saved_path})")


def running_statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that training moves: batch norms' running mean, variance and count. They are
    not parameters, and they move even in frozen layers, yet a model resumed or restored
    without them is another model (a ResNet's evaluation loss changed: a test caught it)."""
    return {f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in model.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._NormBase)
            and module.track_running_stats
            for name, buffer in module.named_buffers(recurse=False) if buffer is not None}


def restorable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every name a checkpoint or snapshot may hold: any parameter (a gradual run's may hold
    groups this model has not opened yet) and the running statistics."""
    return dict(model.named_parameters()) | running_statistics(model)


def changing_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a step can change: the weights that train now, and the running statistics."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad} | \
        running_statistics(model)


def keep_trainable_only(accelerator, model: torch.nn.Module) -> None:
    """Checkpoints hold only the weights that can change: what trains at that moment (the
    adapter and head of a PEFT run, the head of a head-only run, the open groups of gradual
    unfreezing, everything for full fine-tuning), with the batch norms' running statistics,
    which move whatever trains. A LoRA or head checkpoint of a 7B model is
    megabytes, and a frozen or 4-bit base is never re-serialised: on resume it comes from the
    base model as it did at the start. FSDP and DeepSpeed keep their own sharded format."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return

    def save_hook(models, weights, output_dir):
        weights[0] = {n: t.detach() for n, t in changing_tensors(model).items()}

    def load_hook(models, input_dir):
        models.pop(0)  # loaded here instead of by accelerate, which expects every weight
        load_weights(model, Path(input_dir) / MODEL_WEIGHTS)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise PeftlabError(f"{path}: unreadable checkpoint weights ({err})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's weights into the model after checking they fit it: every weight
    that trains now must be there (gradual unfreezing may have saved more, its groups opened
    later), and nothing the model lacks or of another shape."""
    state = read_weights(path)
    params = restorable_tensors(model)
    required = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(required - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise PeftlabError(f"{path}: weights do not match this run's model ({len(missing)} "
                           f"missing, {len(unexpected)} unexpected, e.g. {example}); it was "
                           f"written for another model or strategy")
    for name in sorted(state):
        if state[name].shape != params[name].shape:
            raise PeftlabError(f"{path}: {name} has shape {tuple(state[name].shape)}, the "
                               f"model has {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device))


def save_checkpoint(accelerator, run_dir: Path, state: LoopState,
                    best_weights: dict[str, torch.Tensor] | None, keep: int) -> Path:
    """Write the checkpoint of `state.step` atomically and drop all but the newest `keep`."""
    root = run_dir / CHECKPOINTS
    final = root / step_dir_name(state.step)
    partial = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        for leftover in root.glob("step-*.*"):  # .tmp / .old of a run killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process:
            if best_weights is not None:
                save_file({k: v.contiguous() for k, v in best_weights.items()},
                          str(partial / BEST_WEIGHTS))
            write_loop_state(partial / LOOP_STATE, state)  # last: marks the folder complete
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        raise PeftlabError(f"{final}: could not write the checkpoint ({err}); the previous "
                           f"one is intact: {previous[-1] if previous else 'none'}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _publish(partial, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def _publish(partial: Path, final: Path) -> None:
    """Rename into place; a checkpoint of the same step (saved by an interrupt just before
    the epoch-end one) is swapped out only after the new one is complete."""
    if final.exists():
        _remove(final)
    os.replace(partial, final)


def _remove(checkpoint: Path) -> None:
    """Rename first, then delete: a half-deleted folder is never listed as a checkpoint."""
    doomed = checkpoint.with_name(checkpoint.name + ".old")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def write_loop_state(path: Path, state: LoopState) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(state), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def read_loop_state(path: Path) -> LoopState:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return LoopState(**raw)
    except (OSError, ValueError, TypeError) as err:
        raise PeftlabError(f"{path}: corrupt checkpoint state ({err})") from None


def load_checkpoint(accelerator, path: Path) -> tuple[LoopState, dict | None]:
    """Restore model, optimizer, scheduler and RNG from `path`; return the loop state and
    the best weights so far."""
    state = read_loop_state(path / LOOP_STATE)
    if state.processes != accelerator.num_processes:
        raise PeftlabError(f"{path}: written by {state.processes} processes; resume with the "
                           f"same number (now {accelerator.num_processes}) so the data order "
                           f"and random streams continue exactly")
    if not (path / f"random_states_{accelerator.process_index}.pkl").is_file():
        raise PeftlabError(f"{path}: random states of process {accelerator.process_index} "
                           f"are missing; the checkpoint is incomplete")
    try:
        accelerator.load_state(str(path))
    except PeftlabError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's broken input
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PeftlabError(f"{path}: corrupt or incompatible checkpoint ({first})") from None
    best = path / BEST_WEIGHTS
    return state, (read_weights(best) if best.is_file() else None)
