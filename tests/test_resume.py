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


def resume_from_middle(recipe, tmp_path, step: int):
    """The run, then a copy of it that lost everything after checkpoint `step` and resumed."""
    import shutil

    from conftest import reset_accelerate_state

    from peftlab.config import load_recipe
    from peftlab.train import run
    run(load_recipe(recipe), output_dir=str(tmp_path / "ref"))
    reset_accelerate_state()
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "ref", out)
    for path in out.iterdir():  # what the run wrote after `step`
        if path.name not in ("recipe.yaml", "checkpoints"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in list_checkpoints(out):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    run(load_recipe(recipe), output_dir=str(out), resume="latest")
    return tmp_path / "ref", out


def same_files(ref, out, relative: str):
    ours, theirs = load_file(out / relative), load_file(ref / relative)
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


@pytest.mark.parametrize("strategy, cache", [
    ({"kind": "gradual", "unfreeze_every_steps": 4}, "auto"),  # groups open after the resume
    ({"kind": "qlora", "lora_r": 4}, "auto"),  # a 4-bit base: the checkpoint holds the adapter
    ({"kind": "freeze", "freeze_layers": 1}, False),
    # the frozen features are rebuilt on resume, and the run is still the unbroken one
    ({"kind": "freeze", "freeze_layers": 1}, True),
    ({"kind": "head"}, True),
], ids=["gradual", "qlora", "freeze", "freeze_cached", "head_cached"])
def test_resume_is_exact_for_other_strategies(tmp_path, tiny_bert, sentiment_csv, strategy,
                                              cache):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv, strategy=strategy,
                          train={"max_steps": 14, "batch_size": 8, "lr": 5e-3, "cpu": True,
                                 "save_every_steps": 3, "keep_checkpoints": 10,
                                 "eval_every_steps": 5, "cache_frozen": cache})
    ref, out = resume_from_middle(recipe, tmp_path, step=6)
    artifact = "adapter/adapter_model.safetensors" if strategy["kind"] == "qlora" \
        else "model/model.safetensors"
    same_files(ref, out, artifact)
    assert json.loads((out / "metrics.json").read_text()) == \
        json.loads((ref / "metrics.json").read_text())


def test_resume_is_exact_for_supervised_fine_tuning(tmp_path, tiny_llama):
    """Causal LM: the loss is normalised by target tokens across the resume point."""
    rows = [{"instruction": f"the movie was {'great' if i % 2 else 'awful'}", "input": "",
             "output": "nice" if i % 2 else "bad"} for i in range(64)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, data, model={"task": "causal_lm"},
                          strategy={"kind": "lora", "lora_r": 4, "lora_dropout": 0.1},
                          train={"epochs": 2, "batch_size": 8, "grad_accum": 2, "lr": 1e-2,
                                 "cpu": True, "save_every_steps": 2, "keep_checkpoints": 10},
                          eval={"max_new_tokens": 2})
    ref, out = resume_from_middle(recipe, tmp_path, step=2)
    same_files(ref, out, "adapter/adapter_model.safetensors")
    summaries = [json.loads((run / "summary.json").read_text()) for run in (out, ref)]
    assert summaries[0]["eval_history"] == summaries[1]["eval_history"]
    assert summaries[0]["loss_history"] == summaries[1]["loss_history"]


def test_resume_is_exact_for_augmented_images_decoded_in_workers(tmp_path):
    """A ResNet (batch norm statistics), random crops, flips and rotations drawn in two
    DataLoader workers, resumed mid-epoch: the skipped batches move every later batch to
    another worker, and the run still ends with the unbroken run's exact weights."""
    import numpy as np
    from PIL import Image
    from test_image_classification import save_vision_model, toy_image
    rng = np.random.default_rng(0)
    for label in ("bottom", "top"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(toy_image(rng, label)).save(tmp_path / "images" / label / f"{i}.png")
    model = save_vision_model(tmp_path / "resnet", "resnet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name": str(model), "task": "image_classification"},
        "data": {"train": str(tmp_path / "images"), "workers": 2, "augment_flip": True,
                 "augment_crop_scale": [0.5, 1.0], "augment_rotation": 10},
        "strategy": {"kind": "full"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "cpu": True,
                  "mixed_precision": "no", "save_every_steps": 4, "keep_checkpoints": 10,
                  "eval_every_steps": 5, "report_to": ["none"]}}))
    ref, out = resume_from_middle(recipe, tmp_path, step=4)  # 6 steps per epoch
    same_files(ref, out, "model/model.safetensors")
    assert json.loads((out / "metrics.json").read_text()) == \
        json.loads((ref / "metrics.json").read_text())
