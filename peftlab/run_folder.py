"""Where a run writes, and the rules that protect earlier results and everything else.

A non-empty run folder is never reused unless the user asks (--overwrite) or continues it
(--resume). And --overwrite deletes only what peftlab itself wrote: an empty folder, a run
folder (every entry one that a run writes, and the resolved recipe a run saves), or a merge /
convert output (its marker file and plain files only). `--output-dir ~/work --overwrite`
on a folder of one's own is a one-line error, never a deletion. A symbolic link is never
followed out of the folder: a linked folder is refused, and a link inside is removed as a
link, leaving what it points to alone.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
from pathlib import Path

from peftlab.checkpoints import CHECKPOINTS
from peftlab.config import Recipe, parse_yaml, recipe_to_dict, save_recipe
from peftlab.errors import PeftlabError

RECIPE_FILE = "recipe.yaml"
# what a run writes at its top level; anything else in a folder means it is not only a run
RUN_ENTRIES = {RECIPE_FILE, "peftlab.json", "metrics.json", "summary.json", "adapter", "model",
               "base", "logs", CHECKPOINTS, "samples.jsonl"}  # base: a from-config adapter's
MERGE_MARKER = "peftlab_merge.json"
CONVERT_MARKER = "peftlab_convert.json"


def default_run_dir(recipe: Recipe) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stem = Path(recipe.source).stem if recipe.source.endswith((".yaml", ".yml")) else "run"
    return Path("runs") / stem


def _is_saved_recipe(path: Path) -> bool:
    """A recipe.yaml that a run wrote: every section with every key spelled out (a recipe a
    person writes states only what differs from the defaults)."""
    try:
        saved = parse_yaml(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable or not YAML: not a recipe a run saved
        return False
    if not isinstance(saved, dict):
        return False
    expected = recipe_to_dict(Recipe())
    return all(isinstance(saved.get(section), dict) and set(saved[section]) == set(keys)
               for section, keys in expected.items())


def is_run_folder(folder: Path) -> bool:
    """True for a folder that holds a peftlab run and nothing else."""
    entries = {entry.name for entry in folder.iterdir()}
    return entries <= RUN_ENTRIES and RECIPE_FILE in entries and \
        _is_saved_recipe(folder / RECIPE_FILE)


def is_marked_output(folder: Path, marker: str) -> bool:
    """A merge or convert output: its marker file and plain files, no subfolders or links."""
    entries = list(folder.iterdir())
    return (folder / marker).is_file() and all(
        entry.is_file() and not entry.is_symlink() for entry in entries)


def check_replaceable(folder: Path, overwrite: bool, recognise, what: str) -> None:
    """Refuse, before any work, to write into a non-empty folder unless --overwrite is given
    and `recognise(folder)` says the folder holds only peftlab's own output."""
    if folder.is_symlink():
        raise PeftlabError(f"{folder}: is a symbolic link; give the folder it points to or "
                           f"another folder")
    if folder.exists() and not folder.is_dir():
        raise PeftlabError(f"{folder}: exists and is not a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise PeftlabError(f"{folder}: {what} folder is not empty; pass --overwrite or choose "
                           f"another folder")
    if not recognise(folder):
        raise PeftlabError(f"{folder}: not empty and not a peftlab {what} folder; --overwrite "
                           f"replaces only peftlab's own output, so choose another folder or "
                           f"empty this one yourself")


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    check_replaceable(run_dir, overwrite, is_run_folder, "run")


def clear_folder(folder: Path) -> None:
    """Delete a folder that check_replaceable accepted (links inside go as links)."""
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)


def replace_folder(folder: Path, write) -> None:
    """`write(partial)` into a sibling folder, then swap it in for `folder` (which
    check_replaceable has accepted): an error while writing leaves `folder` as it was."""
    partial = folder.with_name(folder.name + ".partial")
    clear_folder(partial)
    try:
        write(partial)
    except BaseException:
        clear_folder(partial)
        raise
    clear_folder(folder)
    partial.rename(folder)


def resolve_run_dir(recipe: Recipe, output_dir: str | None, resume: str | None) -> Path:
    """The run folder; `--resume PATH` to a checkpoint names its own run, and a run's own
    saved recipe (`RUN/recipe.yaml`) names the folder it sits in, from any directory."""
    if output_dir:
        return Path(output_dir)
    if resume and resume != "latest":
        checkpoint = Path(resume).resolve()
        if checkpoint.parent.name == CHECKPOINTS:
            return checkpoint.parent.parent
    source = Path(recipe.source) if recipe.source else None
    if resume and source is not None and source.name == RECIPE_FILE and \
            source.is_file() and is_run_folder(source.parent):
        return source.parent
    return default_run_dir(recipe)


def prepare_run_folder(run_dir: Path, overwrite: bool, recipe: Recipe, accelerator) -> None:
    if accelerator.is_main_process:
        check_run_dir(run_dir, overwrite)
        if overwrite:
            clear_folder(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # the saved recipe names its folder: `peftlab train RUN/recipe.yaml --resume latest`
        output = dataclasses.replace(recipe.output, dir=str(run_dir))
        save_recipe(dataclasses.replace(recipe, output=output), run_dir / RECIPE_FILE)
    accelerator.wait_for_everyone()


def resume_command(run_dir, processes: int) -> str:
    """A command that continues this run as printed, from the same directory: the run's own
    saved recipe names its folder, whatever --output-dir or overrides started it."""
    recipe = shlex.quote(str(run_dir / "recipe.yaml"))
    launcher = "peftlab" if processes == 1 else \
        f"accelerate launch <the same {processes}-process options> -m peftlab"
    return f"{launcher} train {recipe} --resume latest"
