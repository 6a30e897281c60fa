"""Multi-process training through `accelerate launch`: two CPU ranks (gloo) against one.

2 processes x batch 4 must equal 1 process x batch 8 on the same seed and data order: the
loss is normalised by the items of the whole step across processes, evaluation gathers every
example exactly once, and only the main process writes and prints.
"""

import json
import os
import subprocess
import sys

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
