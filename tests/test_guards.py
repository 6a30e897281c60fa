"""Guards: what a run does when the loss blows up, memory runs out, a checkpoint cannot be
written; and the checkpoint folder itself (newest K kept, none when K is 0)."""

import json
import math

import pytest
from conftest import write_recipe
from safetensors.torch import load_file

import peftlab.checkpoints
import peftlab.train
from peftlab.checkpoints import LOOP_STATE, list_checkpoints
from peftlab.cli import main


def train(recipe, out, capsys, *extra) -> tuple[int, str]:
    overrides = [e for e in extra if not e.startswith("--")]
    flags = [e for e in extra if e.startswith("--")]
    code = main(["train", str(recipe), *overrides, "--output-dir", str(out), *flags])
    err = capsys.readouterr().err.replace("\r", "\n")
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "peftlab: error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0][lines[0].index("peftlab: error:"):]


@pytest.fixture
def full_recipe(tmp_path, tiny_bert, sentiment_csv):
    return write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv, strategy={"kind": "full"},
                        train={"max_steps": 12, "batch_size": 4, "lr": 1e-3, "cpu": True,
                               "save_every_steps": 2, "keep_checkpoints": 2,
                               "log_every_steps": 1, "eval_every_steps": 6})


def test_diverging_loss_stops_with_the_last_good_checkpoint_intact(full_recipe, tmp_path, capsys):
    # a real divergence: lr 1000 without clipping overflows the tiny BERT within ten steps
    code, err = train(full_recipe, tmp_path / "run", capsys, "train.lr=1000",
                      "train.max_grad_norm=0", "train.max_steps=60", "train.scheduler=constant_with_warmup")
    line = error_line(err)
    assert code == 2 and "became nan/inf at step" in line and "Lower train.lr" in line
    bad_step = int(line.split("at step ")[1].split(";")[0])
    good = list_checkpoints(tmp_path / "run")[-1]
    assert f"Last good checkpoint: {good}" in line
    assert json.loads((good / LOOP_STATE).read_text())["step"] < bad_step
    weights = load_file(good / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_resume_still_works(
        full_recipe, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert train(full_recipe, reference, capsys)[0] == 0

    writes = []
    real_write = peftlab.checkpoints.write_loop_state

    def disk_full_on_the_third_checkpoint(path, state):
        writes.append(state.step)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, state)

    monkeypatch.setattr(peftlab.checkpoints, "write_loop_state", disk_full_on_the_third_checkpoint)
    out = tmp_path / "run"
    code, err = train(full_recipe, out, capsys)
    line = error_line(err)
    assert code == 2 and "could not write the checkpoint (" in line and "No space left" in line
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["step-00000002", "step-00000004"]
    assert f"the previous one is intact: {kept[-1]}" in line
    assert not list((out / "checkpoints").glob("*.tmp"))

    monkeypatch.setattr(peftlab.checkpoints, "write_loop_state", real_write)
    code, err = train(full_recipe, out, capsys, "--resume")
    assert code == 0, err
    ours, theirs = (load_file(run / "model" / "model.safetensors") for run in (out, reference))
    assert all(ours[k].equal(theirs[k]) for k in theirs)


def test_out_of_memory_names_peftlab_plan_and_the_knobs(full_recipe, tmp_path, capsys,
                                                        monkeypatch):
    """No GPU here: the error CUDA raises is injected at step 3 of a real run."""
    import torch

    from peftlab.tasks import classification
    prepare = classification.prepare

    def prepare_with_oom(recipe, say):
        task = prepare(recipe, say)
        calls, batch_loss = [], task.batch_loss

        def loss(model, batch):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return batch_loss(model, batch)
        task.batch_loss = loss
        return task

    monkeypatch.setattr(classification, "prepare", prepare_with_oom)
    code, err = train(full_recipe, tmp_path / "run", capsys)
    line = error_line(err)
    assert code == 2
    for needle in ("out of memory", "at step 3 (micro-batch 4)", f"peftlab plan {full_recipe}",
                   "train.batch_size", "train.grad_accum", "gradient_checkpointing", "qlora",
                   "Last checkpoint: "):
        assert needle in line, needle
    assert line.endswith("step-00000002")


def test_only_the_newest_checkpoints_are_kept(full_recipe, tmp_path, capsys):
    assert train(full_recipe, tmp_path / "run", capsys)[0] == 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000010",
                                                                    "step-00000012"]
    kept = list_checkpoints(tmp_path / "run")[-1]
    assert (kept / "optimizer.bin").stat().st_size > 0
    state = json.loads((kept / LOOP_STATE).read_text())
    assert state["step"] == 12 and state["stopped"] and len(state["history"]) == 2
    assert math.isfinite(state["best"])
    assert train(full_recipe, tmp_path / "none", capsys, "train.keep_checkpoints=0")[0] == 0
    assert not (tmp_path / "none" / "checkpoints").exists()
