"""train.report_to with the real tracker libraries, offline: MLflow with a local file store
read back through MLflow's own client, W&B in offline mode, and one MLflow run, not two,
under `accelerate launch` with two processes."""

import json

import pytest
from conftest import write_recipe
from test_distributed import launch

from peftlab.config import load_recipe
from peftlab.train import run

TRAIN = {"epochs": 2, "eval_every_steps": 10, "log_every_steps": 5, "mixed_precision": "no"}


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("peftlab")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def test_mlflow_holds_the_config_every_step_and_the_results(tmp_path, tiny_bert,
                                                            sentiment_csv, monkeypatch):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()  # a local file store (MLflow 3 wants the opt-in)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                                      train={**TRAIN, "report_to": ["mlflow", "tensorboard"]}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    client, runs = mlflow_runs(uri)
    (tracked,) = runs
    assert tracked.info.status == "FINISHED"
    params = tracked.data.params
    assert params["train.lr"] == str(recipe.train.lr) and params["strategy.kind"] == "lora"
    losses = client.get_metric_history(tracked.info.run_id, "train/loss")
    expected = result["summary"]["loss_history"]
    assert [m.step for m in losses] == [p["step"] for p in expected]
    assert [m.value for m in losses] == pytest.approx([p["loss"] for p in expected], abs=1e-6)
    accuracy = client.get_metric_history(tracked.info.run_id, "eval/accuracy")
    assert [m.value for m in accuracy] == pytest.approx(
        [h["accuracy"] for h in result["summary"]["eval_history"]])
    assert tracked.data.metrics["final/test/accuracy"] == pytest.approx(
        result["metrics"]["test"]["accuracy"])
    assert "train/samples_per_second" in tracked.data.metrics
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"metrics.json", "summary.json", "recipe.yaml"} <= artifacts
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))  # beside it


def wandb_records(path):
    """The records of an offline run's .wandb file, parsed with W&B's own protobuf classes.
    The file is a LevelDB-style log (what `wandb sync` uploads): a 7-byte header (":W&B",
    magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (checksum,
    little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in items}


def test_wandb_offline_run_holds_the_metrics(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                                      train={**TRAIN, "report_to": ["wandb"]}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    (run_folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log,) = run_folder.glob("run-*.wandb")
    records = list(wandb_records(log))
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") ==
               "history"]
    losses = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    expected = result["summary"]["loss_history"]
    assert [step for step, _ in losses] == [p["step"] for p in expected]
    assert [loss for _, loss in losses] == pytest.approx([p["loss"] for p in expected],
                                                         abs=1e-6)
    final = next(h for h in history if "final/test/accuracy" in h)
    assert final["final/test/accuracy"] == pytest.approx(result["metrics"]["test"]["accuracy"])
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config |= _items(r.config.update)
    assert config["strategy.kind"] == "lora" and config["train.lr"] == recipe.train.lr
    assert (run_folder / "files" / "metrics.json").read_bytes() == \
        (tmp_path / "run" / "metrics.json").read_bytes()
    assert not (tmp_path / "run" / "logs").exists()  # report_to replaces TensorBoard


def test_two_processes_log_one_mlflow_run(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's reading client
    uri = (tmp_path / "mlruns").as_uri()
    path = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        train={**TRAIN, "report_to": ["mlflow"], "max_steps": 6, "cpu": True})
    done = launch(["train", str(path), "--output-dir", str(tmp_path / "run")], 2,
                  {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert done.returncode == 0, done.stderr[-2000:]
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [m.step for m in losses] == [p["step"] for p in summary["loss_history"]]


def test_unknown_tracker_is_a_recipe_error(tmp_path, tiny_bert, sentiment_csv):
    from peftlab.errors import PeftlabError
    with pytest.raises(PeftlabError, match="train.report_to"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                                 train={"report_to": ["tensorbored"]}))
