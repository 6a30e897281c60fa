"""Security: nothing a recipe, a model folder or a checkpoint holds can run code, and no
secret from the environment ends up in a run folder."""

import shutil
from pathlib import Path

import torch
from conftest import reset_accelerate_state, write_recipe

from peftlab.checkpoints import list_checkpoints
from peftlab.cli import main
from peftlab.config import load_recipe
from peftlab.models import hub_kwargs


def test_resuming_loads_checkpoints_with_torch_load_weights_only(tmp_path, tiny_bert,
                                                                 sentiment_csv, monkeypatch):
    """A checkpoint folder is input like any other: Accelerate restores the optimizer,
    scheduler and RNG state from pickles with torch.load, which runs code unless weights_only.
    torch.load is wrapped where every caller looks it up (Accelerate's `load` helper and its
    own direct calls both read the `torch` module's attribute at call time)."""
    calls = []  # (file name, keywords) per torch.load
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((Path(f).name if isinstance(f, (str, Path)) else repr(f), kwargs))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                          train={"max_steps": 4, "batch_size": 8, "cpu": True,
                                 "save_every_steps": 2, "keep_checkpoints": 5})
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--output-dir", str(run_dir)]) == 0
    reset_accelerate_state()
    for path in run_dir.iterdir():  # back to the state of a run stopped after step 2
        if path.name not in ("recipe.yaml", "checkpoints"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in list_checkpoints(run_dir)[1:]:
        shutil.rmtree(checkpoint)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]
    assert main(["train", str(run_dir / "recipe.yaml"), "--resume", "latest"]) == 0
    assert (run_dir / "summary.json").is_file()
    assert "optimizer.bin" in {name for name, _ in calls}, calls  # the wrapper saw the loads
    assert all(kwargs.get("weights_only") is True for _, kwargs in calls), calls


def test_remote_code_is_off_unless_the_recipe_turns_it_on(tmp_path, tiny_bert, sentiment_csv):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv))
    assert hub_kwargs(recipe)["trust_remote_code"] is False
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                                      model={"trust_remote_code": True}))
    assert hub_kwargs(recipe)["trust_remote_code"] is True


def test_a_yaml_recipe_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", str(recipe)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_no_secret_from_the_environment_reaches_the_run_folder(tmp_path, tiny_bert,
                                                               sentiment_csv, monkeypatch):
    secret = "hf_SENTINELtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                          train={"max_steps": 2, "batch_size": 8, "cpu": True,
                                 "report_to": ["tensorboard"]})
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in files)  # logs were written and read
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
