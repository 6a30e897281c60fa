"""run(recipe): one fine-tuning run on Accelerate, top to bottom.

recipe -> task (data, model, strategy) -> loop (accumulate, clip, schedule, evaluate, stop
early, checkpoint) -> best weights restored -> validation/test metrics -> run folder. Nothing
here is single-process only: metrics go through gather_for_metrics, files are written by the
main process, so `accelerate launch -m peftlab train RECIPE` runs it unchanged. Everything the
loop carries between steps lives in a LoopState, which is what a checkpoint stores besides
Accelerate's own state; that is what makes a resumed run equal an unbroken one.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from peftlab import trackers
from peftlab.batches import pad_for_processes
from peftlab.checkpoints import (
    LoopState,
    changing_tensors,
    check_resumable,
    find_checkpoint,
    keep_trainable_only,
    load_checkpoint,
    restorable_tensors,
    save_checkpoint,
)
from peftlab.config import Recipe, read_yaml
from peftlab.errors import PeftlabError, RunInterrupted
from peftlab.guards import (
    StopRequests,
    is_out_of_memory,
    nonfinite_error,
    out_of_memory_error,
)
from peftlab.hardware import (
    peak_memory_mb,
    peak_reserved_mb,
    resolve_precision,
    set_mmap_threshold,
    trim_heap,
)
from peftlab.memory import fit_batch_to_memory
from peftlab.metrics import format_metrics, is_better
from peftlab.optimizers import DEFAULT_LR, build_optimizer
from peftlab.processes import ddp_kwargs, finish_together
from peftlab.run_folder import (
    check_run_dir,
    prepare_run_folder,
    resolve_run_dir,
    resume_command,
)
from peftlab.strategies import StrategyReport, open_groups
from peftlab.task import Task, micro_batch_groups
from peftlab.tasks import task_module


def _trainable_snapshot(model, known: dict | None = None) -> dict[str, torch.Tensor]:
    """A copy of what can change: the weights that train now and the batch norms' running
    statistics. A 7B head-only run copies its head, not 7B weights. `known` entries are
    kept, not copied again (see _unfreeze)."""
    known = known or {}
    return known | {n: t.detach().to("cpu", copy=True)
                    for n, t in changing_tensors(model).items() if n not in known}


def _restore(model, snapshot: dict[str, torch.Tensor]) -> None:
    targets = restorable_tensors(model)
    with torch.no_grad():
        for name, tensor in targets.items():
            if name in snapshot:
                tensor.copy_(snapshot[name].to(tensor.device))


def _groups_open(report: StrategyReport, recipe: Recipe, step: int, epoch: int) -> int:
    """Gradual unfreezing: one more layer group every K steps, or each epoch when K = 0."""
    every = recipe.strategy.unfreeze_every_steps
    return min(1 + (step // every if every else epoch), len(report.groups))


def batch_extent(batch: dict) -> tuple[int, int, torch.Tensor | int]:
    """(examples, padded tokens, real tokens) of a batch; a batch without tokens (images)
    counts one per example."""
    ids = batch.get("input_ids")
    if ids is None:
        rows = len(next(iter(batch.values())))
        return rows, rows, rows
    real = batch["attention_mask"].sum() if "attention_mask" in batch else ids.numel()
    return ids.shape[0], ids.numel(), real


def run(recipe: Recipe, output_dir: str | None = None, overwrite: bool = False,
        resume: str | None = None) -> dict:
    """Train, evaluate and save one run; returns the metrics, the run summary, the run folder
    and the trained model (best weights restored) as it was evaluated.

    `resume` ("latest" or a checkpoint folder) continues an interrupted run where its last
    checkpoint left it: same weights, optimizer, schedule, data position and random streams,
    so the result equals the run that was never interrupted.
    """
    kind = recipe.strategy.kind
    recipe.train.lr = recipe.train.lr if recipe.train.lr else DEFAULT_LR[kind]
    run_dir = resolve_run_dir(recipe, output_dir, resume)
    checkpoint = None
    if resume:
        if overwrite:
            raise PeftlabError("--resume continues a run and --overwrite deletes it; pass one")
        checkpoint = find_checkpoint(run_dir, resume)
    else:
        check_run_dir(run_dir, overwrite)
    cfg = recipe.train
    precision = resolve_precision(cfg.mixed_precision, cfg.cpu)
    # accumulation is done here, not by Accelerate, so the loss can be normalised by the
    # items (examples or target tokens) of the whole step across micro-batches and processes
    accelerator = Accelerator(mixed_precision=precision, cpu=cfg.cpu,
                              kwargs_handlers=ddp_kwargs(kind),
                              log_with=trackers.trackers_of(recipe) or None,
                              project_config=ProjectConfiguration(
                                  project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
                              # one scheduler step per optimizer step, whatever the processes
                              step_scheduler_with_optimizer=False)
    accelerator.wait_for_everyone()  # every rank checked the run folder before any writes
    say = accelerator.print
    if accelerator.device.type == "cpu" and os.environ.get("PEFTLAB_MMAP_THRESHOLD"):
        set_mmap_threshold(int(os.environ["PEFTLAB_MMAP_THRESHOLD"]))  # benchmarks only
    set_seed(cfg.seed)
    if cfg.auto_batch_size and resume:  # the run's own micro-batch, not today's free memory
        saved = read_yaml(run_dir / "recipe.yaml") or {}
        cfg.batch_size = saved.get("train", {}).get("batch_size", cfg.batch_size)
        cfg.grad_accum = saved.get("train", {}).get("grad_accum", cfg.grad_accum)
    elif cfg.auto_batch_size:
        fit_batch_to_memory(recipe, accelerator.device.type, say)
    if resume:
        check_resumable(run_dir, recipe)
    task: Task = task_module(recipe.model.task).prepare(recipe, say)
    report = task.report
    if cfg.cache_frozen is True and task.cache_frozen is None:
        raise PeftlabError(f"train.cache_frozen: true, but task {recipe.model.task} has no "
                           f"frozen-feature cache; set train.cache_frozen: auto or false")
    if not resume:
        prepare_run_folder(run_dir, overwrite, recipe, accelerator)
    if task.cache_frozen:  # before the loaders are evened out and prepared; rebuilt on resume
        task.cache_frozen(accelerator, run_dir, say)

    examples = {split: len(loader.dataset) for split, loader in task.loaders.items()}
    task.loaders["train"] = pad_for_processes(task.loaders["train"], accelerator.num_processes)
    optimizer = build_optimizer(report.model, recipe, report.head_names)
    if report.groups:  # gradual: DDP syncs only what requires grad when it wraps the model
        open_groups(report.groups, len(report.groups))
    model, optimizer, *prepared = accelerator.prepare(report.model, optimizer,
                                                      *task.loaders.values())
    opened = 1
    if report.groups:
        open_groups(report.groups, opened)
    loaders = dict(zip(task.loaders, prepared))
    updates_per_epoch = math.ceil(len(loaders["train"]) / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * updates_per_epoch)
    scheduler = get_scheduler(cfg.scheduler, optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scheduler = accelerator.prepare(scheduler)  # so save_state/load_state include it
    unwrapped = accelerator.unwrap_model(model)
    keep_trainable_only(accelerator, unwrapped)
    state, best_state = LoopState(processes=accelerator.num_processes), None
    if checkpoint:
        state, best_state = load_checkpoint(accelerator, checkpoint)
        say(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, "
            f"{state.batches_in_epoch} micro-batches into it)")
    trackers.start(accelerator, recipe, run_dir)
    effective = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    say(f"training {total_steps} steps: batch {cfg.batch_size} x {accelerator.num_processes} "
        f"processes x {cfg.grad_accum} accumulation = {effective} effective, "
        f"{'fp32' if precision == 'no' else precision} precision, lr {cfg.lr:g}, "
        f"device {accelerator.device}")

    metric = task.default_metric if cfg.metric_for_best == "auto" else cfg.metric_for_best
    device = accelerator.device
    mine = state.counters[accelerator.process_index] if state.counters else [0.0, 0.0, 0.0]
    window_loss = torch.tensor(mine[0], device=device)
    window_items = torch.tensor(mine[1], device=device)
    # real (non-pad) tokens stay on the device until the end: no host sync per step
    real_tokens = torch.tensor(mine[2], device=device, dtype=torch.float64)
    # set by any non-finite loss or gradient norm; read only when the loss is logged and
    # before a checkpoint, so a bad step never reaches disk and costs no per-step sync
    nonfinite = torch.zeros((), device=device)
    last_checkpoint, saved_step = checkpoint, None
    checked_step = state.step
    # throughput counts only what this process did (a resumed run continues the totals)
    samples_at_start, padded_at_start = state.samples, state.padded_tokens
    bar = tqdm(total=total_steps, initial=state.step, dynamic_ncols=True, mininterval=1.0,
               disable=not accelerator.is_local_main_process, desc=f"train {kind}")
    start, eval_seconds, save_seconds, step_times = time.perf_counter(), 0.0, 0.0, []
    earlier_seconds = state.train_seconds  # spent before a resume

    final_validation: list = []  # (step, result) of an evaluation at the last step

    def evaluate_now() -> None:
        nonlocal best_state, eval_seconds
        eval_start = time.perf_counter()
        trim_heap()  # glibc would keep the step's freed blocks beside evaluation's own
        # the last step's evaluation is the final one too when the best is the last step
        final = state.step == total_steps
        result = task.evaluate(model, loaders["validation"], accelerator, final=final)
        final_validation[:] = [(state.step, result)] if final else []
        if task.on_evaluate:
            task.on_evaluate(model, accelerator, state.step, run_dir)
        model.train()
        trim_heap()  # and evaluation's beside the next steps': CPU peaks stay max(), not sum
        eval_seconds += time.perf_counter() - eval_start
        state.history.append({"step": state.step, "epoch": state.epoch,
                              **{k: result[k] for k in task.history_keys if k in result}})
        accelerator.log({f"eval/{k}": v for k, v in state.history[-1].items()
                         if k not in ("step", "epoch")}, step=state.step)
        if accelerator.is_local_main_process:
            bar.write(f"step {state.step}: " + format_metrics("validation", result))
        if metric not in result:
            raise PeftlabError(f"train.metric_for_best: '{metric}' is not a metric of this "
                               f"task; choose from {', '.join(task.history_keys)}")
        if is_better(result[metric], state.best, metric):
            state.best, state.best_step, state.stale = result[metric], state.step, 0
            best_state = _trainable_snapshot(unwrapped)
        else:
            state.stale += 1
            if cfg.early_stopping_patience and state.stale >= cfg.early_stopping_patience:
                say(f"early stopping at step {state.step}: no {metric} gain in "
                    f"{state.stale} evaluations")
                state.stopped = True

    def unfreeze() -> None:
        """Open the groups due by now. A group opening after the best evaluation still had,
        at that evaluation, the values it has now: they join the best snapshot, so restoring
        it gives back the whole model as it was then, while only what opened is copied."""
        nonlocal opened, best_state
        want = _groups_open(report, recipe, state.step, state.epoch) if report.groups else 0
        if want > opened:
            open_groups(report.groups, want)
            opened = want
            if best_state is not None:
                best_state = _trainable_snapshot(unwrapped, best_state)

    def check_finite(flag: float | None = None) -> None:
        nonlocal checked_step
        if flag is None:
            flag = accelerator.reduce(nonfinite.clone(), "sum").item()
        if flag:
            raise nonfinite_error(checked_step + 1, state.step, last_checkpoint)
        checked_step = state.step

    def log_loss() -> None:
        # one sync per log period: the loss over every process's items, and the nan check
        window = accelerator.reduce(torch.stack([window_loss, window_items, nonfinite]), "sum")
        check_finite(window[2].item())
        mean_loss = (window[0] / window[1].clamp(min=1)).item()
        state.loss_history.append({"step": state.step, "loss": round(mean_loss, 6)})
        rate = (state.samples - samples_at_start) / (time.perf_counter() - start - eval_seconds)
        bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{rate:.1f}")
        accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                         "train/samples_per_second": rate}, step=state.step)
        window_loss.zero_()
        window_items.zero_()

    def checkpoint_now() -> None:
        nonlocal last_checkpoint, saved_step, save_seconds
        if not cfg.keep_checkpoints or saved_step == state.step:
            return
        check_finite()
        save_start = time.perf_counter()
        counters = torch.stack([window_loss.double(), window_items.double(), real_tokens])
        state.counters = accelerator.gather(counters).view(-1, 3).tolist()
        state.train_seconds = train_time()
        last_checkpoint = save_checkpoint(accelerator, run_dir, state, best_state,
                                          cfg.keep_checkpoints)
        saved_step = state.step
        save_seconds += time.perf_counter() - save_start

    def train_time() -> float:
        return earlier_seconds + time.perf_counter() - start

    def stop_if_requested(stops: StopRequests) -> None:
        if not stops.requested(accelerator):
            return
        checkpoint_now()
        accelerator.end_training()
        saved = (f"checkpoint {last_checkpoint}; continue with "
                 f"`{resume_command(run_dir, accelerator.num_processes)}`"
                 if cfg.keep_checkpoints else "no checkpoint (train.keep_checkpoints is 0)")
        raise RunInterrupted(f"interrupted at step {state.step}: {saved}")

    if cfg.eval_at_start and checkpoint is None:
        evaluate_now()
    with StopRequests() as stops:
        try:
            while not state.stopped and state.step < total_steps:
                unfreeze()
                model.train()
                loaders["train"].set_epoch(state.epoch)  # epoch e's order depends on e only
                batches = loaders["train"]
                if state.batches_in_epoch:
                    batches = accelerator.skip_first_batches(batches, state.batches_in_epoch)
                for group in micro_batch_groups(batches, cfg.grad_accum):
                    tick = time.perf_counter()
                    counts = torch.stack([task.count_items(batch) for batch in group])
                    total_items = accelerator.reduce(counts.sum(), "sum").clamp(min=1)
                    for index, batch in enumerate(group):
                        last = index == len(group) - 1
                        with nullcontext() if last else accelerator.no_sync(model):
                            loss_sum = task.batch_loss(model, batch)
                            # DDP averages gradients over processes: scale back to a global mean
                            accelerator.backward(loss_sum * accelerator.num_processes
                                                 / total_items)
                        window_loss += loss_sum.detach()
                        nonfinite.add_((~torch.isfinite(loss_sum.detach())).float())
                        rows, padded, real = batch_extent(batch)
                        state.samples += rows * accelerator.num_processes
                        state.padded_tokens += padded * accelerator.num_processes
                        real_tokens += real
                    window_items += counts.sum()
                    if cfg.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        if precision != "fp16":  # fp16's scaler skips inf steps by design
                            nonfinite.add_((~torch.isfinite(norm)).float())
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    state.batches_in_epoch += len(group)
                    step_times.append(time.perf_counter() - tick)
                    bar.update(1)
                    unfreeze()
                    if state.step % cfg.log_every_steps == 0 or state.step == total_steps:
                        log_loss()
                    if (cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0
                            or state.step == total_steps):
                        evaluate_now()
                    state.stopped = state.stopped or state.step >= total_steps
                    end_of_epoch = state.batches_in_epoch >= len(loaders["train"])
                    every = cfg.save_every_steps
                    if state.stopped or (every and state.step % every == 0 and not end_of_epoch):
                        checkpoint_now()
                    stop_if_requested(stops)
                    if state.stopped:
                        break
                else:  # the epoch ended without a stop
                    if not cfg.eval_every_steps:
                        evaluate_now()
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                    checkpoint_now()
                    stop_if_requested(stops)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise out_of_memory_error(recipe.source, device, state.step, cfg.batch_size,
                                      last_checkpoint) from None
        finally:
            bar.close()  # before any message, so it does not land inside the bar's line
    check_finite()
    train_seconds = train_time()

    if best_state is not None:
        _restore(unwrapped, best_state)
    metrics = {split: task.evaluate(model, loaders[split], accelerator, final=True)
               if split != "validation" or not final_validation or
               final_validation[0][0] != state.best_step else final_validation[0][1]
               for split in ("validation", "test") if split in loaders}
    for split, values in metrics.items():
        say(format_metrics(split, values))
    sorted_times = sorted(step_times) or [0.0]
    train_only = max(time.perf_counter() - start - eval_seconds - save_seconds, 1e-9)
    real_tokens = accelerator.reduce(real_tokens - mine[2], "sum").item()
    samples = state.samples - samples_at_start
    padded_tokens = state.padded_tokens - padded_at_start
    summary = {
        "strategy": kind, **task.summary, "trainable_params": report.trainable,
        "total_params": report.total, "trainable_percent": round(report.percent, 4),
        "steps": state.step, "best_step": state.best_step, "metric_for_best": metric,
        "best_value": state.best, "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2), "checkpoint_seconds": round(save_seconds, 2),
        "samples_per_second": round(samples / train_only, 2),
        "tokens_per_second": round(real_tokens / train_only, 1),
        "padded_tokens_per_second": round(padded_tokens / train_only, 1),
        "median_step_seconds": round(sorted_times[len(sorted_times) // 2], 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "peak_reserved_mb": peak_reserved_mb(device),
        "precision": precision, "processes": accelerator.num_processes,
        "distributed": accelerator.distributed_type.value,
        "effective_batch": effective, "device": str(device), "examples": examples,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "eval_history": state.history, "loss_history": state.loss_history,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        task.save(unwrapped, run_dir, precision)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    trackers.finish(accelerator, recipe, run_dir, metrics, state.step)
    model = optimizer = scheduler = prepared = loaders = None  # the DDP wrapper, freed
    finish_together(accelerator)
    say(f"run folder: {run_dir}  ({train_seconds:.1f}s training, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB)")
    return {"metrics": metrics, "summary": summary, "run_dir": str(run_dir), "model": unwrapped}
