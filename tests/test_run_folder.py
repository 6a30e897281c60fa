"""What `--overwrite` may delete, and finding a run again: only peftlab's own output is ever
replaced, a symbolic link is never followed out of a folder, and a run's saved recipe
resumes it from any directory with the command the interrupted run printed."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, write_recipe

from peftlab.cli import main

ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture
def quick_recipe(tmp_path, tiny_bert, sentiment_csv):
    return write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        train={"max_steps": 2, "batch_size": 8, "cpu": True})


def error_of(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_overwrite_replaces_a_run_but_never_a_folder_of_ones_own(tmp_path, quick_recipe,
                                                                 capsys):
    run = tmp_path / "run"
    assert main(["train", str(quick_recipe), "--output-dir", str(run)]) == 0
    first = (run / "summary.json").stat().st_mtime_ns
    assert main(["train", str(quick_recipe), "--output-dir", str(run), "--overwrite"]) == 0
    assert (run / "summary.json").stat().st_mtime_ns != first  # a run is replaced

    work = tmp_path / "work"  # a user's folder: their recipe and their data
    work.mkdir()
    (work / "recipe.yaml").write_text(quick_recipe.read_text())
    (work / "notes.txt").write_text("mine")
    assert main(["train", str(quick_recipe), "--output-dir", str(work), "--overwrite"]) == 2
    assert "not a peftlab run folder" in error_of(capsys)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "recipe.yaml"]

    (run / "predictions.csv").write_text("mine too")  # a run folder the user added to
    assert main(["train", str(quick_recipe), "--output-dir", str(run), "--overwrite"]) == 2
    assert (run / "predictions.csv").read_text() == "mine too"


def test_overwrite_never_follows_a_symbolic_link(tmp_path, quick_recipe, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    run = tmp_path / "run"
    assert main(["train", str(quick_recipe), "--output-dir", str(run)]) == 0
    (run / "logs").symlink_to(outside, target_is_directory=True)  # inside: a link out
    assert main(["train", str(quick_recipe), "--output-dir", str(run), "--overwrite"]) == 0
    assert (outside / "precious.txt").read_text() == "keep"

    linked = tmp_path / "linked"  # the folder itself: a link to a run
    linked.symlink_to(run, target_is_directory=True)
    assert main(["train", str(quick_recipe), "--output-dir", str(linked), "--overwrite"]) == 2
    assert "symbolic link" in error_of(capsys)
    assert (run / "summary.json").is_file()


def test_merge_overwrites_only_an_earlier_merge_and_a_failed_merge_keeps_it(
        tmp_path, quick_recipe, tiny_bert, sentiment_csv, capsys):
    run = tmp_path / "run"
    assert main(["train", str(quick_recipe), "--output-dir", str(run)]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0
    assert main(["merge", str(run), str(merged)]) == 2  # not empty, no --overwrite
    assert main(["merge", str(run), str(merged), "--overwrite"]) == 0
    files = sorted(p.name for p in merged.iterdir())

    full = write_recipe(tmp_path / "full.yaml", tiny_bert, sentiment_csv,
                        strategy={"kind": "full"}, train={"max_steps": 1, "cpu": True})
    assert main(["train", str(full), "--output-dir", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "full"), str(merged), "--overwrite"]) == 2
    assert "not an adapter run" in error_of(capsys)
    assert sorted(p.name for p in merged.iterdir()) == files  # the earlier merge is whole

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert main(["merge", str(run), str(mine), "--overwrite"]) == 2
    assert "not a peftlab merge folder" in error_of(capsys)
    assert (mine / "config.json").read_text() == "{}"


def test_the_printed_resume_command_works_as_shown_from_another_directory(tmp_path,
                                                                          quick_recipe):
    """SIGTERM mid-run: the message's command, run exactly as printed, finishes the run. The
    run was started with a relative --output-dir, and is resumed from another directory
    through its saved recipe as well."""
    start = tmp_path / "start"
    start.mkdir()
    recipe = quick_recipe.read_text().replace("max_steps: 2", "max_steps: 400")
    (start / "r.yaml").write_text(recipe)
    process = subprocess.Popen(
        [sys.executable, "-m", "peftlab", "train", "r.yaml", "--output-dir", "out",
         "train.save_every_steps=2"], cwd=start, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((start / "out" / "checkpoints").glob("step-*[0-9]")):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    message = stderr.replace("\r", "\n").strip().splitlines()[-1]
    command = message.split("`")[1]
    assert command == "peftlab train out/recipe.yaml --resume latest"
    shutil.copytree(start / "out", tmp_path / "moved")  # the same run, in another folder

    resumed = subprocess.run([sys.executable, "-m", "peftlab", *shlex.split(command)[1:]],
                             cwd=start, env=ENV, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (start / "out" / "summary.json").is_file()

    elsewhere = tmp_path / "elsewhere"  # its saved recipe names a relative "out"
    elsewhere.mkdir()
    moved = subprocess.run([sys.executable, "-m", "peftlab", "train",
                            str(tmp_path / "moved" / "recipe.yaml"), "--resume", "latest"],
                           cwd=elsewhere, env=ENV, capture_output=True, text=True, timeout=600,
                           check=False)
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert (tmp_path / "moved" / "summary.json").is_file()
    assert not (elsewhere / "out").exists()
