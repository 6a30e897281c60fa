"""End-to-end behaviour of the training loop on the tiny BERT and a learnable task."""

import json

import pytest
import torch
from conftest import reset_accelerate_state, write_recipe
from safetensors.torch import load_file

from peftlab.artifacts import load_trained
from peftlab.config import load_recipe
from peftlab.tasks.classification import predict_texts
from peftlab.train import run

TEXTS = ["the movie was really great", "a terrible and boring film", "this show is nice",
         "awful ending with sad music"]



@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert, sentiment_csv):
    folder = tmp_path_factory.mktemp("lora_run")
    recipe = load_recipe(write_recipe(folder / "recipe.yaml", tiny_bert, sentiment_csv,
                                      train={"report_to": ["tensorboard"]}))
    result = run(recipe, output_dir=str(folder / "run"))
    reset_accelerate_state()
    return folder / "run", result


def test_full_fine_tuning_learns_the_task(tmp_path, tiny_bert, sentiment_csv):
    path = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        strategy={"kind": "full"}, train={"lr": 3e-3})
    result = run(load_recipe(path), output_dir=str(tmp_path / "run"))
    history = result["summary"]["eval_history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.1
    assert result["metrics"]["test"]["accuracy"] >= 0.85


def test_lora_run_folder(lora_run, tiny_bert):
    run_dir, result = lora_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"validation", "test"}
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "f1_weighted",
                "per_class", "confusion_matrix"):
        assert key in metrics["test"]
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == metrics["test"]["examples"]
    assert set(metrics["test"]["per_class"]) == {"neg", "pos"}
    for name in ("recipe.yaml", "summary.json", "peftlab.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logs").rglob("events.out.tfevents*"))
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in adapter), "the new head travels with the adapter"
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    assert result["summary"]["trainable_params"] == 3906


def test_reload_gives_identical_predictions(lora_run):
    run_dir, _ = lora_run
    model, tokenizer, recipe, info = load_trained(run_dir)
    first = predict_texts(model, tokenizer, TEXTS, recipe.model.max_length)
    model2, tokenizer2, _, _ = load_trained(run_dir)
    assert predict_texts(model2, tokenizer2, TEXTS, recipe.model.max_length) == first
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=recipe.model.max_length,
                      return_tensors="pt")
    with torch.no_grad():  # each (label, probability) is the argmax and max of the softmax
        probs = model(**batch).logits.float().softmax(-1)
    assert [label for label, _ in first] == probs.argmax(-1).tolist()
    assert torch.allclose(torch.tensor([prob for _, prob in first]), probs.max(-1).values,
                          atol=1e-6)
    assert info["label_names"] == ["neg", "pos"]


def test_adapter_loads_with_plain_peft(lora_run, tiny_bert):
    """The run folder needs nothing of peftlab: transformers + peft give the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    run_dir, _ = lora_run
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ours, *_ = load_trained(run_dir)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-6)


def test_accumulation_matches_a_bigger_batch(tmp_path, tiny_bert, sentiment_csv):
    """batch 8 x accumulation 1 == batch 4 x accumulation 2 (same seed and order)."""
    weights = []
    for batch, accum in ((8, 1), (4, 2)):
        path = write_recipe(tmp_path / f"r{batch}.yaml", tiny_bert, sentiment_csv,
                            strategy={"kind": "full"},
                            train={"batch_size": batch, "grad_accum": accum, "max_steps": 6,
                                   "group_by_length": False, "lr": 1e-3, "warmup_ratio": 0.0})
        run(load_recipe(path), output_dir=str(tmp_path / f"run{batch}"))
        weights.append(load_file(tmp_path / f"run{batch}" / "model" / "model.safetensors"))
        reset_accelerate_state()
    changed = False
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-5), name
    initial = load_file(tiny_bert / "model.safetensors")
    for name, tensor in initial.items():
        key = name if name in weights[0] else f"bert.{name}"
        changed |= key in weights[0] and not torch.allclose(tensor, weights[0][key])
    assert changed, "the runs must actually have trained"


def test_head_only_mean_pooling_round_trip(tmp_path, tiny_bert, sentiment_csv):
    path = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        model={"pooling": "mean"}, strategy={"kind": "head"},
                        train={"max_steps": 10, "lr": 1e-2})
    result = run(load_recipe(path), output_dir=str(tmp_path / "run"))
    assert result["summary"]["trainable_params"] == 32 * 2 + 2
    assert (tmp_path / "run" / "model" / "classifier.safetensors").is_file()
    model, tokenizer, *_ = load_trained(tmp_path / "run")
    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        again, _, _, _ = load_trained(tmp_path / "run")
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_gradual_unfreezing_changes_lower_layers_late(tmp_path, tiny_bert, sentiment_csv):
    path = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        strategy={"kind": "gradual", "unfreeze_every_steps": 4},
                        train={"max_steps": 8, "lr": 1e-3})
    run(load_recipe(path), output_dir=str(tmp_path / "run"))
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    initial = load_file(tiny_bert / "model.safetensors")
    same = {n: torch.equal(initial[n], trained[f"bert.{n}"]) for n in initial
            if f"bert.{n}" in trained}
    assert not same["encoder.layer.1.output.dense.weight"]  # opened after 4 steps
    assert same["encoder.layer.0.output.dense.weight"]  # would open after 8 (the end)
    assert same["embeddings.word_embeddings.weight"]


def test_run_folder_is_never_overwritten(tmp_path, recipe_file):
    from peftlab.errors import PeftlabError
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{\"keep\": true}")
    with pytest.raises(PeftlabError, match="not empty"):
        run(load_recipe(recipe_file), output_dir=str(run_dir))
    assert (run_dir / "metrics.json").read_text() == "{\"keep\": true}"


def test_early_stopping_after_patience_evaluations(tmp_path, tiny_bert, sentiment_csv):
    """With a learning rate too small to move the metric, the run stops after `patience`
    evaluations without improvement, and the best (first) checkpoint is the one kept."""
    path = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        strategy={"kind": "full"},
                        train={"max_steps": 20, "lr": 1e-12, "eval_every_steps": 1,
                               "early_stopping_patience": 2, "metric_for_best": "accuracy"})
    result = run(load_recipe(path), output_dir=str(tmp_path / "run"))
    assert result["summary"]["steps"] == 3
    assert result["summary"]["best_step"] == 1
    assert len(result["summary"]["eval_history"]) == 3


def test_merged_model_matches_the_adapter(lora_run, tmp_path):
    """`peftlab merge` writes a plain transformers model with the adapter's logits."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.cli import main
    run_dir, _ = lora_run
    assert main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ours, tokenizer, *_ = load_trained(run_dir)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, ours(**batch).logits, atol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_head_checkpoints_and_best_snapshot_hold_only_the_head(tmp_path, tiny_bert,
                                                               sentiment_csv):
    """A head-only run copies its head, not the frozen body, into checkpoints and into the
    best-weights snapshot (a 7B body would be copied at every improvement otherwise)."""
    path = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        strategy={"kind": "head"},
                        train={"epochs": 1, "lr": 1e-2, "eval_every_steps": 5,
                               "save_every_steps": 10, "keep_checkpoints": 5})
    run(load_recipe(path), output_dir=str(tmp_path / "run"))
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        for name in ("model.safetensors", "best.safetensors"):
            assert set(load_file(checkpoint / name)) == {"classifier.weight",
                                                          "classifier.bias"}, name


def test_gradual_restores_groups_that_opened_after_the_best_step(tmp_path, tiny_bert,
                                                                 sentiment_csv):
    """The best evaluation is the untrained one (step 0; then a destructive lr). Groups that
    opened later changed after it: restoring the best weights must give them back as they
    were at step 0, although the snapshot then held only the head."""
    from transformers import BertModel
    path = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                        strategy={"kind": "gradual", "unfreeze_every_steps": 3},
                        train={"max_steps": 12, "lr": 5.0, "warmup_ratio": 0.0,
                               "eval_at_start": True, "eval_every_steps": 4,
                               "metric_for_best": "loss", "keep_checkpoints": 0})
    result = run(load_recipe(path), output_dir=str(tmp_path / "run"))
    history = result["summary"]["eval_history"]
    assert result["summary"]["best_step"] == 0 and history[-1]["loss"] > history[0]["loss"]
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    pretrained = BertModel.from_pretrained(tiny_bert).state_dict()
    body = {f"bert.{name}": tensor for name, tensor in pretrained.items()
            if f"bert.{name}" in saved}
    assert any(".layer." in name for name in body)
    for name, tensor in body.items():
        assert torch.equal(saved[name], tensor), name
