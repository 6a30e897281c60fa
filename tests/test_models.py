import shutil
import sys

import pytest

from peftlab.config import recipe_from_dict
from peftlab.errors import PeftlabError
from peftlab.models import resolve_model_path
from peftlab.tasks.classification_model import choose_pooling


def test_model_from_a_folder_inside_an_installed_package(tmp_path, tiny_bert, monkeypatch):
    package = tmp_path / "site" / "fake_models_pkg"
    shutil.copytree(tiny_bert, package / "weights")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("fake_models_pkg", None)
    assert resolve_model_path("pkg:fake_models_pkg/weights") == str(package / "weights")
    with pytest.raises(PeftlabError, match="no config.json"):
        resolve_model_path("pkg:fake_models_pkg/missing")


def test_model_path_errors(tmp_path):
    with pytest.raises(PeftlabError, match="is not installed"):
        resolve_model_path("pkg:surely_not_a_package_42/model")
    with pytest.raises(PeftlabError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftlabError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"  # a hub id


def test_auto_pooling_is_mean_only_for_frozen_mean_trained_bodies(tmp_path, tiny_bert):
    folder = tmp_path / "st"
    shutil.copytree(tiny_bert, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')

    def pooling(kind, path, value="auto"):
        recipe = recipe_from_dict({"data": {"train": "x"}, "strategy": {"kind": kind},
                                   "model": {"pooling": value}})
        return choose_pooling(recipe, str(path))

    assert pooling("head", folder) == "mean"
    assert pooling("lora", folder) == "cls"  # keeps adapters loadable by plain peft
    assert pooling("head", tiny_bert) == "cls"  # not trained for mean pooling
    assert pooling("full", tiny_bert, "mean") == "mean"
