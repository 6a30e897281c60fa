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


STRATEGIES = {
    "full": {"kind": "full"}, "head": {"kind": "head"},
    "freeze": {"kind": "freeze", "freeze_layers": 1},
    # groups open at steps 10, 20 and 30: after DDP wrapped the model
    "gradual": {"kind": "gradual", "unfreeze_every_steps": 10},
    "lora": {"kind": "lora", "lora_r": 4}, "dora": {"kind": "dora", "lora_r": 4},
    "qlora": {"kind": "qlora", "lora_r": 4},  # 4-bit matmuls pinned to fp32 below
    "peft": {"kind": "peft", "peft": {"peft_type": "IA3"}},
}
LR = {"full": 1e-3, "freeze": 1e-3, "gradual": 1e-3, "head": 1e-2}


def trained_weights(run_dir):
    folder = run_dir / ("adapter" if (run_dir / "adapter").is_dir() else "model")
    return load_file(folder / ("adapter_model.safetensors" if folder.name == "adapter"
                               else "model.safetensors"))


def one_against_two_processes(tmp_path, recipe, batch: int, no_effect: tuple[str, ...] = ()):
    """The recipe run by 2 processes x batch `batch`, and in this process x 2 * batch.
    `no_effect`: weights that cannot change any output (a bias added to every position
    before a softmax over positions): their gradient is rounding noise, which Adam scales
    up to full steps, so they are left out of the comparison."""
    from conftest import reset_accelerate_state

    from peftlab.config import load_recipe
    from peftlab.train import run
    two = launch(["train", recipe, "--output-dir", tmp_path / "two"], processes=2)
    assert two.returncode == 0, two.stderr[-2000:]
    run(load_recipe(recipe, [f"train.batch_size={2 * batch}"]), output_dir=str(tmp_path / "one"))
    reset_accelerate_state()
    summaries = [json.loads((tmp_path / run / "summary.json").read_text())
                 for run in ("one", "two")]
    assert [s["processes"] for s in summaries] == [1, 2]
    assert summaries[0]["effective_batch"] == summaries[1]["effective_batch"] == 2 * batch
    curves = [[point["loss"] for point in s["loss_history"]] for s in summaries]
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)
    evals = [[point["loss"] for point in s["eval_history"]] for s in summaries]
    assert evals[0] == pytest.approx(evals[1], abs=1e-5)
    weights = [trained_weights(tmp_path / run) for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        if name.endswith(no_effect):
            continue
        assert (weights[0][name] - weights[1][name]).abs().max() < 1e-5, name
    return two, summaries


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_cpu_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_bert,
                                                                  sentiment_csv, strategy):
    """DDP averages only the gradients it registered when it wrapped the model: gradual
    unfreezing opens groups later, which must be averaged all the same."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                          model={"compute_dtype": "float32"}, strategy=STRATEGIES[strategy],
                          train={"epochs": 1, "batch_size": 4, "lr": LR.get(strategy, 1e-2),
                                 "cpu": True, "group_by_length": False,
                                 "eval_every_steps": 10})
    two, summaries = one_against_two_processes(tmp_path, recipe, batch=4)
    assert two.stdout.count("training 40 steps: batch 4 x 2 processes x 1 accumulation = 8 "
                            "effective") == 1  # printed by the main process only
    assert len(summaries[0]["loss_history"]) == 8 and len(summaries[0]["eval_history"]) == 4
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for split in ("validation", "test"):  # every example once: no padding duplicates
        assert sum(map(sum, metrics[split]["confusion_matrix"])) == 40
        assert metrics[split]["examples"] == 40


def test_causal_lm_loss_is_normalised_by_every_process_tokens(tmp_path, tiny_llama):
    """Completions of 2 to 6 words: the two processes hold different numbers of target
    tokens in every step, and the loss is still the sum over the step's tokens divided by
    all of them, so 2 x batch 2 equals 1 x batch 4."""
    rows = [{"prompt": "the movie", "completion": " was " + " ".join(["good"] * (1 + i % 5))}
            for i in range(48)]
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, data, model={"task": "causal_lm"},
                          strategy={"kind": "lora", "lora_r": 4},
                          eval={"max_new_tokens": 1, "batch_size": 4},
                          train={"epochs": 1, "batch_size": 2, "lr": 1e-2, "cpu": True,
                                 "group_by_length": False, "eval_every_steps": 3})
    from peftlab.config import load_recipe
    from peftlab.models import load_tokenizer
    from peftlab.tasks.causal_lm import count_target_tokens
    from peftlab.tasks.sft_data import collate_sft, load_sft_data
    tokenizer = load_tokenizer(str(tiny_llama), load_recipe(recipe))
    train = load_sft_data(load_recipe(recipe), tokenizer).splits["train"]
    collate = collate_sft(tokenizer.pad_token_id)
    per_rank = [int(count_target_tokens(collate([train[i], train[i + 1]])))
                for i in range(0, 4, 2)]
    assert per_rank[0] != per_rank[1]  # the first step's two ranks see unequal token counts
    one_against_two_processes(tmp_path, recipe, batch=2)


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
