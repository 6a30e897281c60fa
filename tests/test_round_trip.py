"""Every strategy, trained in fp32 and in bf16, is usable afterwards: reloaded in a fresh
process, `predict`, `eval` and `merge` give the labels and probabilities of the model at the
end of training.

Precision is a dimension of this test, not an accident of the host: `no` and `bf16` are
pinned, and `auto` follows the host (CI runs this file again with PEFTLAB_CPU_BF16=1, where
auto means bf16 on any CPU). A bf16 run stores its frozen base in bf16 and its head in fp32;
inference must autocast as training did, or head-only runs cannot even run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    NEGATIVE,
    POSITIVE,
    REPO,
    reset_accelerate_state,
    sentiment_rows,
    write_recipe,
    write_rows,
)

from peftlab.config import load_recipe
from peftlab.hardware import resolve_precision
from peftlab.quantization import compute_dtype
from peftlab.tasks.classification import predict_texts
from peftlab.train import run

STRATEGIES = {
    "full": {"kind": "full"},
    "head": {"kind": "head"},
    "freeze": {"kind": "freeze", "freeze_layers": 1},
    "gradual": {"kind": "gradual", "unfreeze_every_steps": 10},
    "lora": {"kind": "lora", "lora_r": 4},
    "dora": {"kind": "dora", "lora_r": 4},
    "qlora": {"kind": "qlora", "lora_r": 4},
    "peft": {"kind": "peft", "peft": {"peft_type": "LOHA", "r": 4}},
}
MERGEABLE = ("lora", "dora", "qlora", "peft")
LR = {"full": 5e-3, "freeze": 5e-3, "gradual": 5e-3, "head": 5e-2}
PRECISIONS = ("no", "bf16", "auto")

# the fresh process: the CLI's predict and eval, then merge and a plain transformers load of
# the merged folder, for every run; it writes what it saw next to each run
CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from peftlab.cli import main
    texts_file, runs = sys.argv[1], sys.argv[2:]
    texts = [line.split(",", 1)[0] for line in Path(texts_file).read_text().splitlines()[1:]]
    for run in map(Path, runs):
        assert main(["predict", str(run), "--file", texts_file,
                     "--output", str(run / "predicted.csv")]) == 0
        assert main(["eval", str(run), "--json", str(run / "reevaluated.json")]) == 0
        if (run / "adapter").is_dir() and json.loads(
                (run / "peftlab.json").read_text())["pooling"] != "mean":
            assert main(["merge", str(run), str(run / "merged")]) == 0
            model = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
            tokenizer = AutoTokenizer.from_pretrained(run / "merged")
            with torch.no_grad():
                batch = tokenizer(texts, padding=True, truncation=True, max_length=16,
                                  return_tensors="pt")
                probs = model(**batch).logits.float().softmax(-1)
            (run / "merged.json").write_text(json.dumps(probs.tolist()))
""")


@pytest.fixture(scope="module")
def sentiment_bert(tmp_path_factory, tiny_bert):
    """The tiny BERT with word embeddings that already know polarity, as a pretrained body
    would: every strategy, adapters and head-only included, then learns the task in a few
    dozen steps, so the comparisons below are of models that really answer."""
    from transformers import BertModel, BertTokenizerFast
    folder = tmp_path_factory.mktemp("sentiment_bert")
    tokenizer = BertTokenizerFast.from_pretrained(tiny_bert)
    model = BertModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        embeddings = model.embeddings.word_embeddings.weight
        for words, sign in ((POSITIVE, 1.0), (NEGATIVE, -1.0)):
            embeddings[tokenizer.convert_tokens_to_ids(words), :8] += sign
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts_csv(tmp_path_factory):
    rows = sentiment_rows(40, seed=7)
    return write_rows(tmp_path_factory.mktemp("texts") / "texts.csv", rows)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module", params=PRECISIONS)
def trained(request, tmp_path_factory, sentiment_bert, sentiment_csv, texts_csv):
    """Every strategy trained in one precision; the end-of-training predictions kept in
    memory; then one fresh process runs predict, eval and merge over all of them."""
    precision = request.param
    root = tmp_path_factory.mktemp(f"round_trip_{precision}")
    texts = [row["text"] for row in read_rows(texts_csv)]
    results = {}
    for name, strategy in STRATEGIES.items():
        recipe_file = write_recipe(
            root / f"{name}.yaml", sentiment_bert, sentiment_csv,
            model={"pooling": "mean" if name == "head" else "auto"}, strategy=strategy,
            train={"epochs": 2, "lr": LR.get(name, 2e-2), "mixed_precision": precision,
                   "eval_every_steps": 10, "group_by_length": False})
        recipe = load_recipe(recipe_file)
        result = run(recipe, output_dir=str(root / name))
        reset_accelerate_state()
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(root / name / ("adapter" if (
            root / name / "adapter").is_dir() else "model"))
        result["predictions"] = predict_texts(result.pop("model"), tokenizer, texts, 16,
                                              result["summary"]["precision"])
        results[name] = result
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", CHILD, str(texts_csv),
                            *(str(root / name) for name in STRATEGIES)],
                           env=env, capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    return precision, results


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_reloaded_run_predicts_evaluates_and_merges_like_the_trained_model(trained, strategy,
                                                                          texts_csv):
    precision, results = trained
    result = results[strategy]
    resolved = resolve_precision(precision, use_cpu=False)
    assert result["summary"]["precision"] == resolved
    run_dir = Path(result["run_dir"])
    info = json.loads((run_dir / "peftlab.json").read_text())
    assert info["precision"] == resolved

    trained_labels = [label for label, _ in result["predictions"]]
    trained_probs = torch.tensor([prob for _, prob in result["predictions"]])
    with open(run_dir / "predicted.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = info["label_names"]
    assert [names.index(row["predicted_label"]) for row in rows] == trained_labels
    reloaded = torch.tensor([float(row["probability"]) for row in rows])
    # the same weights, the same autocast: equal up to the 6 decimals the CSV keeps
    assert torch.allclose(reloaded, trained_probs, atol=2e-6), (reloaded - trained_probs).abs().max()
    truth = [names.index(row["label"]) for row in read_rows(texts_csv)]
    right = sum(a == b for a, b in zip(trained_labels, truth))
    assert right >= 0.9 * len(truth)  # it learned: the comparison is of a model that answers

    again = json.loads((run_dir / "reevaluated.json").read_text())
    for split in ("validation", "test"):
        assert again[split]["confusion_matrix"] == result["metrics"][split]["confusion_matrix"]
        assert again[split]["loss"] == pytest.approx(result["metrics"][split]["loss"], abs=1e-6)

    if strategy in MERGEABLE:
        merged = torch.tensor(json.loads((run_dir / "merged.json").read_text()))
        # merged into fp32 weights: exact for a run that computed in fp32; a bf16 run (or a
        # 4-bit base computing in bf16) differs by the bf16 rounding of what it computed
        computed_fp32 = resolved == "no" and (
            strategy != "qlora" or compute_dtype(load_recipe(run_dir / "recipe.yaml"))
            == torch.float32)
        tolerance = 1e-5 if computed_fp32 else 0.03
        merged_probs = merged.gather(1, torch.tensor(trained_labels)[:, None]).squeeze(1)
        assert torch.allclose(merged_probs, trained_probs, atol=tolerance)
        clear = trained_probs > 0.5 + tolerance  # no rounding can move these labels
        assert merged.argmax(-1)[clear].tolist() == torch.tensor(trained_labels)[clear].tolist()
