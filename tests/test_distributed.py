"""Multi-process training through `accelerate launch`: two CPU ranks (gloo) against one.

2 processes x batch 4 must equal 1 process x batch 8 on the same seed and data order: the
loss is normalised by the items of the whole step across processes, evaluation gathers every
example exactly once, and only the main process writes and prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_recipe
from safetensors.torch import load_file

CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert path.read_text().startswith("# ")  # says what it is for, how to run it


def launch(args, processes: int, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               **(env_extra or {}))
    if processes == 1:
        command = [sys.executable, "-m", "peftlab", *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "peftlab",
                   *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_two_cpu_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_bert,
                                                                  sentiment_csv):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                          strategy={"kind": "full"},
                          train={"epochs": 1, "batch_size": 4, "lr": 1e-3, "cpu": True,
                                 "group_by_length": False, "eval_every_steps": 10})
    two = launch(["train", recipe, "--output-dir", tmp_path / "two"], processes=2)
    assert two.returncode == 0, two.stderr[-2000:]
    one = launch(["train", recipe, "train.batch_size=8", "--output-dir", tmp_path / "one"],
                 processes=1)
    assert one.returncode == 0, one.stderr[-2000:]

    assert two.stdout.count("training 40 steps: batch 4 x 2 processes x 1 accumulation = 8 "
                            "effective") == 1  # printed by the main process only
    summaries = [json.loads((tmp_path / run / "summary.json").read_text())
                 for run in ("one", "two")]
    assert [s["processes"] for s in summaries] == [1, 2]
    assert summaries[0]["effective_batch"] == summaries[1]["effective_batch"] == 8
    curves = [[point["loss"] for point in s["loss_history"]] for s in summaries]
    assert len(curves[0]) == 8 and curves[0] == pytest.approx(curves[1], abs=1e-5)
    evals = [[point["loss"] for point in s["eval_history"]] for s in summaries]
    assert len(evals[0]) == 4 and evals[0] == pytest.approx(evals[1], abs=1e-5)

    weights = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] - weights[1][name]).abs().max() < 1e-5, name

    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for split in ("validation", "test"):  # every example once: no padding duplicates
        assert sum(map(sum, metrics[split]["confusion_matrix"])) == 40
        assert metrics[split]["examples"] == 40


def kill_9_every_process_of(run_dir) -> None:
    import signal
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline.split("\0"):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_two_processes_resume_exactly_after_kill_9(tmp_path, tiny_bert, sentiment_csv):
    """Each rank restores its own RNG and log counters: the resumed 2-process run equals
    the unbroken one bit for bit (adapter dropout makes the RNG matter)."""
    import time

    from peftlab.checkpoints import list_checkpoints
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                          strategy={"kind": "lora", "lora_r": 4, "lora_dropout": 0.2},
                          train={"epochs": 2, "batch_size": 4, "lr": 1e-2, "cpu": True,
                                 "save_every_steps": 7, "log_every_steps": 5})
    reference = launch(["train", recipe, "--output-dir", tmp_path / "ref"], processes=2)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "peftlab", "train",
         str(recipe), "--output-dir", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not [p for p in list_checkpoints(out) if p.name >= "step-00000021"]:
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.05)
        kill_9_every_process_of(out)  # the launcher and both ranks (own sessions)
    finally:
        process.wait(timeout=60)
    assert not (out / "summary.json").exists()

    resumed = launch(["train", recipe, "--output-dir", out, "--resume"], processes=2)
    errors = [line for line in resumed.stderr.splitlines() if "peftlab: error" in line]
    assert resumed.returncode == 0, errors or resumed.stderr[-2000:]
    assert resumed.stdout.count("resumed from") == 1
    ours, theirs = (load_file(run / "adapter" / "adapter_model.safetensors")
                    for run in (out, tmp_path / "ref"))
    assert all(ours[k].equal(theirs[k]) for k in theirs)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (out, tmp_path / "ref")]
    for key in ("loss_history", "eval_history"):
        assert summaries[0][key] == summaries[1][key]
    assert json.loads((out / "metrics.json").read_text()) == \
        json.loads((tmp_path / "ref" / "metrics.json").read_text())
