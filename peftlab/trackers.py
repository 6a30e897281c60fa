"""Experiment trackers through Accelerate's own (`train.report_to`): TensorBoard by default,
or any list of `tensorboard`, `wandb`, `mlflow`, `trackio`, `comet_ml`, `aim`, `clearml`,
`dvclive`, `swanlab`; `none` for no tracker.

Accelerate logs on the main process only, so a run under `accelerate launch` records one
run per tracker. What goes in: the recipe flattened (`train.lr`, ...) as the run's config;
losses, learning rate, throughput and every evaluation metric per step (train.py); at the
end the final metrics, and the run folder's result files as artifacts where the tracker
keeps files (MLflow artifacts, W&B run files). Where each writes: TensorBoard under
<run>/logs; W&B under <run>/wandb (WANDB_MODE=offline works without an account); MLflow
where MLFLOW_TRACKING_URI points (a local `mlruns/` folder by default).
"""

from __future__ import annotations

from pathlib import Path

from peftlab.config import Recipe, recipe_to_dict

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml",
            "dvclive", "swanlab")
PROJECT = "peftlab"  # the MLflow experiment, W&B project, TensorBoard subfolder of logs/
RESULT_FILES = ("metrics.json", "summary.json", "recipe.yaml")


def trackers_of(recipe: Recipe) -> list[str]:
    return [name for name in recipe.train.report_to if name != "none"]


def flat_config(recipe: Recipe) -> dict:
    flat = {}
    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) \
                else str(value)
    return flat


def start(accelerator, recipe: Recipe, run_dir: Path) -> None:
    names = trackers_of(recipe)
    if not names:
        return
    options = {"wandb": {"dir": str(run_dir), "name": run_dir.name},
               "mlflow": {"run_name": run_dir.name}}
    accelerator.init_trackers(PROJECT, config=flat_config(recipe),
                              init_kwargs={k: v for k, v in options.items() if k in names})


def finish(accelerator, recipe: Recipe, run_dir: Path, metrics: dict, step: int) -> None:
    """The final metrics (numbers only), then the result files as artifacts."""
    if not trackers_of(recipe) or not accelerator.is_main_process:
        return
    final = {f"final/{split}/{key}": value for split, values in metrics.items()
             for key, value in values.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
    accelerator.log(final, step=step)
    files = [run_dir / name for name in RESULT_FILES if (run_dir / name).is_file()]
    for name in trackers_of(recipe):
        if name == "mlflow":
            tracker = accelerator.get_tracker("mlflow")
            for path in files:
                tracker.log_artifact(str(path))
        elif name == "wandb":
            run = accelerator.get_tracker("wandb", unwrap=True)
            for path in files:
                run.save(str(path), base_path=str(run_dir), policy="now")
