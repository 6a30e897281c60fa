"""Security: nothing a recipe, a model folder or a checkpoint holds can run code, and no
secret from the environment ends up in a run folder."""

import re

from conftest import REPO, write_recipe

from peftlab.cli import main
from peftlab.config import load_recipe
from peftlab.models import hub_kwargs


def test_every_torch_load_in_the_package_is_weights_only():
    for path in (REPO / "peftlab").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


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
                          train={"max_steps": 2, "batch_size": 8, "cpu": True},
                          output={"tensorboard": True})
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in files)  # logs were written and read
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
