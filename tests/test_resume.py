"""Checkpoints and resume: a run killed (kill -9) or interrupted (Ctrl-C) at a random step and
resumed ends with exactly the weights, metrics and curves of the run that was never stopped.

Every run here is a subprocess with the same thread count, so any difference is the
resume's fault, not the machine's. The recipe has what makes resuming hard: adapter dropout
(RNG state), length-grouped shuffling, accumulation, two epochs, eval every 20 steps and
checkpoints that do not fall on epoch ends.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, write_recipe
from safetensors.torch import load_file

from peftlab.checkpoints import LOOP_STATE, list_checkpoints

ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def peftlab(*args) -> list[str]:
    return [sys.executable, "-m", "peftlab", *map(str, args)]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_bert, sentiment_csv):
    folder = tmp_path_factory.mktemp("resume")
    return write_recipe(folder / "r.yaml", tiny_bert, sentiment_csv,
                        strategy={"kind": "lora", "lora_r": 4, "lora_dropout": 0.2},
                        train={"epochs": 2, "batch_size": 4, "grad_accum": 2, "lr": 1e-2,
                               "cpu": True, "save_every_steps": 3, "keep_checkpoints": 3,
                               "eval_every_steps": 20, "log_every_steps": 5})


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(peftlab("train", recipe, "--output-dir", out), env=ENV,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def wait_for_checkpoint(process, run_dir, min_step: int) -> int:
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]
        if steps and max(steps) >= min_step:
            return max(steps)
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def assert_same_run(resumed, reference):
    for name in ("adapter_model.safetensors",):
        ours, theirs = load_file(resumed / "adapter" / name), load_file(reference / "adapter" / name)
        assert ours.keys() == theirs.keys()
        for key in ours:  # bit-exact, not approximately equal
            assert ours[key].equal(theirs[key]), key
    assert json.loads((resumed / "metrics.json").read_text()) == \
        json.loads((reference / "metrics.json").read_text())
    summaries = [json.loads((run / "summary.json").read_text()) for run in (resumed, reference)]
    for key in ("loss_history", "eval_history", "steps", "best_step", "best_value"):
        assert summaries[0][key] == summaries[1][key], key
    assert len(summaries[0]["loss_history"]) == 16 and len(summaries[0]["eval_history"]) == 4


def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(recipe, reference,
                                                                          tmp_path):
    out = tmp_path / "run"
    target = random.Random().randint(3, 45)  # a different step on every test run
    process = subprocess.Popen(peftlab("train", recipe, "--output-dir", out), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = wait_for_checkpoint(process, out, target)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    latest = list_checkpoints(out)[-1]
    assert int(latest.name.split("-")[1]) >= seen
    # keep_checkpoints is 3; a kill between publishing a checkpoint and pruning leaves 4
    assert len(list_checkpoints(out)) <= 4

    resumed = subprocess.run(peftlab("train", recipe, "--output-dir", out, "--resume"),
                             env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest}" in resumed.stdout
    assert_same_run(out, reference)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]


def test_ctrl_c_saves_the_current_step_and_resume_finishes_the_same_run(recipe, reference,
                                                                        tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(peftlab("train", recipe, "--output-dir", out), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(process, out, 9)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    message = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert message.startswith("peftlab: interrupted at step ") and "--resume latest" in message
    step = int(message.split("interrupted at step ")[1].split(":")[0])
    latest = list_checkpoints(out)[-1]
    assert latest.name == f"step-{step:08d}"
    assert json.loads((latest / LOOP_STATE).read_text())["step"] == step

    resumed = subprocess.run(peftlab("train", out / "recipe.yaml", "--resume", "latest"),
                             env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, reference)
