"""Where a run writes, and the rule that protects earlier results: a non-empty run folder
is never reused unless the user asks (--overwrite) or continues it (--resume)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from peftlab.checkpoints import CHECKPOINTS
from peftlab.config import Recipe, save_recipe
from peftlab.errors import PeftlabError


def default_run_dir(recipe: Recipe) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stem = Path(recipe.source).stem if recipe.source.endswith((".yaml", ".yml")) else "run"
    return Path("runs") / stem


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty run folder before any work, so earlier results are never lost."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PeftlabError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise PeftlabError(f"{run_dir}: run folder is not empty; pass --overwrite or choose "
                           f"another --output-dir")


def resolve_run_dir(recipe: Recipe, output_dir: str | None, resume: str | None) -> Path:
    """The run folder; `--resume PATH` to a checkpoint names its own run."""
    run_dir = Path(output_dir) if output_dir else default_run_dir(recipe)
    if resume and resume != "latest" and not output_dir:
        checkpoint = Path(resume).resolve()
        if checkpoint.parent.name == CHECKPOINTS:
            run_dir = checkpoint.parent.parent
    return run_dir


def prepare_run_folder(run_dir: Path, overwrite: bool, recipe: Recipe, accelerator) -> None:
    if accelerator.is_main_process:
        check_run_dir(run_dir, overwrite)
        if run_dir.is_dir() and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # the saved recipe names its folder: `peftlab train RUN/recipe.yaml --resume latest`
        output = dataclasses.replace(recipe.output, dir=str(run_dir))
        save_recipe(dataclasses.replace(recipe, output=output), run_dir / "recipe.yaml")
    accelerator.wait_for_everyone()
