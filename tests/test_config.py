from pathlib import Path

import pytest
import yaml

from peftlab.config import Recipe, load_recipe, recipe_from_dict, resolve_data_path, save_recipe
from peftlab.errors import PeftlabError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_types():
    recipe = recipe_from_dict({"data": {"train": "x.csv"}, "train": {"lr": 1}})
    assert isinstance(recipe, Recipe)
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.strategy.kind == "lora"
    assert recipe.data.split_ratios == [0.8, 0.1, 0.1]


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(PeftlabError) as err:
        recipe_from_dict({"data": {"train": "x.csv"}, "train": {"learning_rate": 1e-4}}, "r.yaml")
    message = str(err.value)
    assert "train.learning_rate" in message and "unknown key" in message
    assert "lr" in message and "batch_size" in message


def test_unknown_section():
    with pytest.raises(PeftlabError, match="unknown section 'trainer'"):
        recipe_from_dict({"data": {"train": "x.csv"}, "trainer": {}})


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "batch_size", "big", "expected int"),
    ("train", "batch_size", 2.5, "expected int"),
    ("train", "group_by_length", 1, "expected bool"),
    ("data", "split_ratios", 0.8, "expected a list"),
    ("strategy", "target_modules", "query", "expected"),
])
def test_wrong_types(section, key, value, expected):
    raw = {"data": {"train": "x.csv"}}
    raw.setdefault(section, {})[key] = value
    with pytest.raises(PeftlabError, match=expected) as err:
        recipe_from_dict(raw)
    assert f"{section}.{key}" in str(err.value)


def test_unknown_strategy_lists_choices():
    with pytest.raises(PeftlabError, match="strategy.kind: unknown value 'lorax'.*lora, dora"):
        recipe_from_dict({"data": {"train": "x.csv"}, "strategy": {"kind": "lorax"}})


def test_cross_field_checks():
    with pytest.raises(PeftlabError, match="split_ratios"):
        recipe_from_dict({"data": {"train": "x", "split_ratios": [0.5, 0.2, 0.2]}})
    with pytest.raises(PeftlabError, match="data.train is required"):
        recipe_from_dict({})
    with pytest.raises(PeftlabError, match="peft_type"):
        recipe_from_dict({"data": {"train": "x"}, "strategy": {"kind": "peft"}})


def test_overrides_are_type_checked(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "x.csv"}}))
    recipe = load_recipe(path, ["train.lr=3e-4", "strategy.kind=dora", "data.label_names=[a,b]"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.strategy.kind == "dora"
    assert recipe.data.label_names == ["a", "b"]
    with pytest.raises(PeftlabError, match="train.batch_size: expected int"):
        load_recipe(path, ["train.batch_size=many"])
    with pytest.raises(PeftlabError, match="unknown key"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(PeftlabError, match="section.key=value"):
        load_recipe(path, ["train.lr"])


def test_overrides_read_against_the_field_type(tmp_path):
    """`no`, `on`, `off` are documented text values, not YAML 1.1 booleans; a text field takes
    the text as written, an optional one takes null, a boolean takes yes/no too."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "x.csv", "validation": "v.csv"}}))
    recipe = load_recipe(path, ["train.mixed_precision=no", "data.text_column=123",
                                "data.label_delimiter=:", "data.validation=null",
                                "train.cpu=yes", "train.group_by_length=off",
                                "model.quantization=none"])
    assert recipe.train.mixed_precision == "no"
    assert recipe.data.text_column == "123" and recipe.data.label_delimiter == ":"
    assert recipe.data.validation is None
    assert recipe.train.cpu is True and recipe.train.group_by_length is False
    assert recipe.model.quantization == "none"


def test_a_recipe_file_reads_no_as_text(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train: x.csv\ntrain:\n  mixed_precision: no\n  cpu: yes\n")
    recipe = load_recipe(path)
    assert recipe.train.mixed_precision == "no" and recipe.train.cpu is True


def test_hub_metrics_need_an_explicit_trust_flag():
    """evaluate.load runs a Python script downloaded from the Hub."""
    base = {"data": {"train": "x"}, "eval": {"hub_metrics": ["matthews_correlation"]}}
    with pytest.raises(PeftlabError, match="eval.trust_hub_metrics"):
        recipe_from_dict(base)
    trusted = recipe_from_dict({**base, "eval": {**base["eval"], "trust_hub_metrics": True}})
    assert trusted.eval.hub_metrics == ["matthews_correlation"]


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(PeftlabError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(PeftlabError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_saved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict({"data": {"train": "x.csv"}, "train": {"lr": 2e-4}})
    save_recipe(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.train == recipe.train and again.strategy == recipe.strategy
    assert again.data.train.endswith("x.csv") and again.data.train.startswith("/")


def test_data_paths_resolve_against_peftlab_data(tmp_path, monkeypatch):
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    (tmp_path / "data" / "sst2" / "train.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "recipes").mkdir()
    recipe_path = tmp_path / "recipes" / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({"data": {"train": "sst2/train.tsv"}}))
    recipe = load_recipe(recipe_path)
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path / "data"))
    assert resolve_data_path("sst2/train.tsv", recipe) == str(
        (tmp_path / "data" / "sst2" / "train.tsv").resolve())
    monkeypatch.delenv("PEFTLAB_DATA")
    (tmp_path / "recipes" / "local.csv").write_text("text,label\n")
    assert resolve_data_path("local.csv", recipe) == str(tmp_path / "recipes" / "local.csv")
    assert resolve_data_path("imdb", recipe) == "imdb"  # a hub dataset name stays a name


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml"))
                         + [REPO / "peftlab" / "quickstart" / "recipe.yaml"],
                         ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    lines = path.read_text().splitlines()
    assert all(line.startswith("#") for line in lines[:3]), "recipes open with 3 comment lines"
    assert recipe.data.train
