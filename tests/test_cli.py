"""The CLI end to end in a subprocess, and every bad input as one line with exit code 2."""

import csv
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, write_recipe, write_rows

from peftlab.cli import main


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

    out = tmp_path / "out.csv"
    predicted = peftlab("predict", run_dir, "--file", sentiment_csv, "--output", out)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 400 and {"text", "label", "predicted_label", "probability"} <= set(rows[0])
    by_text = {row["text"]: row["predicted_label"] for row in rows}
    assert [by_text.get(t, line.split("\t")[0]) for t, line in zip(texts, lines)] == [
        line.split("\t")[0] for line in lines]

    evaluated = peftlab("eval", run_dir, "--data", sentiment_csv, "--json", tmp_path / "m.json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "eval: accuracy=" in evaluated.stdout
    assert (tmp_path / "m.json").is_file()


def run_main(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("peftlab: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("section, values, needle", [
    ("train", {"learning_rate": 1e-4}, "train.learning_rate: unknown key"),
    ("strategy", {"kind": "prefix"}, "strategy.kind: unknown value 'prefix'"),
    ("train", {"batch_size": "eight"}, "train.batch_size: expected int"),
    ("model", {"name": "./no/such/model"}, "model folder does not exist"),
    ("model", {"name": "pkg:no_such_package_xyz/model"}, "is not installed"),
    ("data", {"train": "missing.csv"}, "data file not found"),
    ("data", {"text_column": "sentence"}, "no column 'sentence'"),
    ("data", {"label_column": "target"}, "no column 'target'"),
])
def test_bad_recipe_values_exit_2(tmp_path, tiny_bert, sentiment_csv, capsys, section, values,
                                  needle):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv, **{section: values})
    code, err = run_main(["train", recipe, "--output-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, needle", [
    ("", "the file is empty"),
    ("text,label\n", "no data rows"),
    ("text,label\nonly one,pos\nanother,pos\nthird,pos\n", "only one class"),
    ("text,label\n\"unclosed quote,pos\nx,neg\n", "could not read"),
])
def test_bad_data_files_exit_2(tmp_path, tiny_bert, capsys, content, needle):
    data = tmp_path / "d.csv"
    data.write_text(content)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, data)
    code, err = run_main(["train", recipe, "--output-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, needle)


def test_bad_encoding_exits_2(tmp_path, tiny_bert, capsys):
    data = tmp_path / "d.csv"
    data.write_bytes("text,label\ncaf\xe9 ok,pos\nbad,neg\n".encode("latin-1"))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, data)
    code, err = run_main(["train", recipe, "--output-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, str(data))


def test_unknown_label_in_validation_exits_2(tmp_path, tiny_bert, sentiment_csv, capsys):
    val = write_rows(tmp_path / "val.csv", [{"text": "the plot", "label": "mixed"}])
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, sentiment_csv,
                          data={"validation": str(val)})
    code, err = run_main(["train", recipe, "--output-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "label 'mixed' does not occur in train")


def test_missing_recipe_and_bad_override_exit_2(tmp_path, recipe_file, capsys):
    assert_one_line_error(*run_main(["train", tmp_path / "nope.yaml"], capsys), "not found")
    assert_one_line_error(*run_main(["train", recipe_file, "train.lr"], capsys),
                          "section.key=value")
    assert_one_line_error(*run_main(["train", recipe_file, "train.epochs=many"], capsys),
                          "train.epochs")


def test_non_empty_run_folder_is_kept(tmp_path, recipe_file, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("earlier results")
    code, err = run_main(["train", recipe_file, "--output-dir", run_dir], capsys)
    assert_one_line_error(code, err, "not empty", "--overwrite")
    assert (run_dir / "metrics.json").read_text() == "earlier results"


def test_eval_and_predict_on_a_non_run_exit_2(tmp_path, capsys):
    assert_one_line_error(*run_main(["eval", tmp_path], capsys), "not a finished peftlab run")
    assert_one_line_error(*run_main(["predict", tmp_path, "--text", "hi"], capsys),
                          "not a finished peftlab run")
    assert_one_line_error(*run_main(["predict", tmp_path], capsys), "--text")
