"""The CLI end to end in a subprocess: train, predict (texts and a file), eval.
Every bad input, as one line with exit code 2, is in test_bad_inputs.py."""

import csv
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, write_rows


def peftlab(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "peftlab", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_train_predict_eval_end_to_end(tmp_path, recipe_file, sentiment_csv):
    run_dir = tmp_path / "run"
    done = peftlab("train", recipe_file, "train.epochs=1", "strategy.kind=dora",
                   "--output-dir", run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trainable params" in done.stdout and "test: accuracy=" in done.stdout
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["strategy"]["kind"] == "dora"

    texts = ["the movie was great", "a terrible film"]
    predicted = peftlab("predict", run_dir, "--text", texts[0], "--text", texts[1])
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    lines = predicted.stdout.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == texts
    assert all(line.split("\t")[0] in ("neg", "pos") for line in lines)

    with open(sentiment_csv, newline="") as handle:  # the data set plus the two texts
        inputs = list(csv.DictReader(handle)) + [{"text": texts[0], "label": "pos"},
                                                 {"text": texts[1], "label": "neg"}]
    out = tmp_path / "out.csv"
    predicted = peftlab("predict", run_dir, "--file", write_rows(tmp_path / "in.csv", inputs),
                        "--output", out)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 402 and {"text", "label", "predicted_label", "probability"} <= set(rows[0])
    by_text = {row["text"]: row for row in rows}
    for text, line in zip(texts, lines):  # a file predicts what --text predicts
        label, probability, _ = line.split("\t")
        assert by_text[text]["predicted_label"] == label, (text, by_text[text], line)
        assert float(by_text[text]["probability"]) == pytest.approx(float(probability),
                                                                    abs=1e-4)

    evaluated = peftlab("eval", run_dir, "--data", sentiment_csv, "--json", tmp_path / "m.json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "eval: accuracy=" in evaluated.stdout
    assert (tmp_path / "m.json").is_file()


def test_overrides_may_follow_options_and_bitsandbytes_stays_quiet(tmp_path, recipe_file):
    """`train R --output-dir X key=value` works (argparse alone refuses it), and no command
    prints bitsandbytes' import-time warning about an optional Hub kernel."""
    import json
    import logging

    __import__("peftlab")  # sets the logger level, before anything imports bitsandbytes
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() >= \
        logging.ERROR
    trust = logging.getLogger("kernels._internals.hf_hub")
    assert not trust.filter(logging.LogRecord(
        trust.name, logging.WARNING, "", 0, "Skipping publisher trust check for 'x' because "
        "Hugging Face Hub is in offline mode.", None, None))
    assert trust.filter(logging.LogRecord(trust.name, logging.WARNING, "", 0,
                                          "Publisher of 'x' is not trusted", None, None))
    done = peftlab("train", recipe_file, "--output-dir", tmp_path / "run", "train.max_steps=3",
                   "train.mixed_precision=no", "--overwrite", "train.cpu=true")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["precision"] == "no"
    assert "kernels-community" not in done.stderr + done.stdout
    wrong = peftlab("train", recipe_file, "--output-dir", tmp_path / "x", "--colour")
    assert wrong.returncode == 2 and "unrecognized arguments: --colour" in wrong.stderr
