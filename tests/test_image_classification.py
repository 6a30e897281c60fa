"""Image classification on tiny ViT and ResNet models: every data format, bad images, colour
modes, train-only augmentation, each strategy's trainable set, a learnable toy set, and the
trained run read back by predict, eval, plain peft and the HTTP server in fresh processes."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reset_accelerate_state

from peftlab.config import load_recipe
from peftlab.errors import PeftlabError

pytest.importorskip("torchvision")  # the [vision] extra; CI installs it with [dev]


def toy_image(rng, label: str, size: int = 16) -> np.ndarray:
    """Noise with a bright top or bottom half: learnable from a few dozen images."""
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    half = slice(0, size // 2) if label == "top" else slice(size // 2, size)
    pixels[half] += 150
    return pixels


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from PIL import Image
    root = tmp_path_factory.mktemp("images") / "folder"
    rng = np.random.default_rng(0)
    for label in ("bottom", "top"):
        (root / label).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(toy_image(rng, label)).save(root / label / f"{i:02d}.png")
    (root / "top" / "notes.txt").write_text("not an image: ignored by its suffix")
    return root


def save_vision_model(folder: Path, kind: str, channels: int = 3) -> Path:
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )
    torch.manual_seed(0)
    if kind == "vit":
        model = ViTForImageClassification(ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_channels=channels,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        model = ResNetForImageClassification(ResNetConfig(
            num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
            layer_type="basic"))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * channels,
                      image_std=[0.5] * channels).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    return save_vision_model(tmp_path_factory.mktemp("vit"), "vit")


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> Path:
    return save_vision_model(tmp_path_factory.mktemp("resnet"), "resnet")


def image_recipe(tmp_path: Path, model: Path, train, *overrides, **data) -> object:
    import yaml
    body = {"model": {"name": str(model), "task": "image_classification"},
            "data": {"train": str(train), "workers": 0, **data},
            "strategy": {"kind": "lora", "lora_r": 4},
            "train": {"epochs": 6, "batch_size": 8, "lr": 1e-2, "mixed_precision": "no",
                      "report_to": ["none"], "log_every_steps": 5, "keep_checkpoints": 0}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return load_recipe(path, list(overrides))


def write_idx(folder: Path, images: np.ndarray, labels: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, len(images), *images.shape[1:]))
        handle.write(images.astype(np.uint8).tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, len(labels)) + bytes(labels))
    return folder


def test_every_data_format_reads_the_same_labelled_images(tmp_path, image_folder, tiny_vit):
    import datasets
    from PIL import Image

    from peftlab.tasks.image_data import load_image_data, open_image
    files = sorted(p for p in image_folder.rglob("*.png"))
    labels = [p.parent.name for p in files]
    table = tmp_path / "table"
    table.mkdir()
    rows = [{"path": str(p.relative_to(image_folder.parent)), "kind": label}
            for p, label in zip(files, labels)]
    (image_folder.parent / "images.csv").write_text(
        "path,kind\n" + "".join(f"{r['path']},{r['kind']}\n" for r in rows))
    (image_folder.parent / "images.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": labels}).cast_column(
        "image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    pixels = np.stack([np.asarray(Image.open(p).convert("L")) for p in files])
    idx = write_idx(tmp_path / "idx", pixels, [int(label == "top") for label in labels])

    sources = {"folder": (image_folder, {}),
               "csv": (image_folder.parent / "images.csv",
                       {"image_column": "path", "label_column": "kind"}),
               "jsonl": (image_folder.parent / "images.jsonl",
                         {"image_column": "path", "label_column": "kind"}),
               "datasets": (tmp_path / "saved", {}),
               "idx": (idx, {"label_names": ["bottom", "top"]})}
    seen = {}
    for name, (source, columns) in sources.items():
        data = load_image_data(image_recipe(tmp_path, tiny_vit, source, **columns))
        assert data.label_names == ["bottom", "top"], name
        sizes = {split: len(rows["labels"]) for split, rows in data.splits.items()}
        assert sizes == {"train": 48, "validation": 6, "test": 6}, name
        # the same seeded stratified split of the same 60 images, whatever the format
        first = data.splits["test"]["image"][0]
        seen[name] = np.asarray(open_image(first, "L"))
        assert sorted(data.splits["test"]["labels"]) == [0, 0, 0, 1, 1, 1], name
    for name, image in seen.items():
        np.testing.assert_array_equal(image, seen["folder"], err_msg=name)


def test_bad_images_are_a_one_line_error_naming_the_file_or_skipped_and_counted(
        tmp_path, image_folder, tiny_vit):
    import shutil

    from peftlab.tasks.image_data import format_image_report, load_image_data
    folder = tmp_path / "folder"
    shutil.copytree(image_folder, folder)
    (folder / "top" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "bottom" / "empty.jpg").write_bytes(b"")
    with pytest.raises(PeftlabError, match=r"bottom/empty\.jpg is not a readable image"):
        load_image_data(image_recipe(tmp_path, tiny_vit, folder))
    data = load_image_data(image_recipe(tmp_path, tiny_vit, folder, bad_images="skip"))
    assert data.report["train"]["bad_image"] == 2
    assert sum(len(rows["labels"]) for rows in data.splits.values()) == 60
    assert "skipped: 2 bad image" in format_image_report(data)
    with pytest.raises(PeftlabError, match="no column 'picture'"):
        (tmp_path / "t.csv").write_text("path,label\nx.png,a\n")
        load_image_data(image_recipe(tmp_path, tiny_vit, tmp_path / "t.csv",
                                     image_column="picture"))


def test_grayscale_and_rgba_images_become_what_the_model_expects(tmp_path):
    from PIL import Image

    from peftlab.tasks.image_data import open_image
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((4, 4), 100, np.uint8)).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(rgba)  # fully transparent black
    assert open_image(str(gray), "RGB").mode == "RGB"
    assert np.asarray(open_image(str(gray), "RGB"))[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(open_image(str(rgba), "RGB"))[0, 0].tolist() == [255, 255, 255]
    assert open_image(str(rgba), "L").mode == "L"


def test_augmentation_changes_training_images_only(tmp_path, image_folder, tiny_vit):
    from transformers import AutoImageProcessor

    from peftlab.tasks.image_classification import prepare
    from peftlab.tasks.image_data import open_image
    recipe = image_recipe(tmp_path, tiny_vit, image_folder, augment_crop_scale=[0.3, 0.6],
                          augment_flip=True, augment_rotation=15)
    task = prepare(recipe, lambda _: None)
    processor = AutoImageProcessor.from_pretrained(tiny_vit)
    train = task.loaders["train"].dataset
    first = train[0]["pixel_values"]
    torch.manual_seed(1)  # the global RNG plays no part: (seed, epoch, index) decide
    assert torch.equal(train[0]["pixel_values"], first)
    train.set_epoch(1)
    assert not torch.equal(train[0]["pixel_values"], first)  # a new crop, flip and angle
    for split in ("validation", "test"):
        rows = task.loaders[split].dataset
        plain = processor(images=open_image(rows.images[0], "RGB"),
                          return_tensors="pt")["pixel_values"][0]
        assert torch.equal(rows[0]["pixel_values"], plain), split
        assert rows.transform.augment is None


def test_augmented_training_is_the_same_with_any_number_of_workers(tmp_path, image_folder,
                                                                   tiny_resnet):
    """Each augmented image draws from (seed, epoch, index), not from the stream of the
    worker that happened to decode it: 0 and 2 workers train bit-identical models."""
    from safetensors.torch import load_file

    from peftlab.train import run
    weights = []
    for workers in (0, 2):
        folder = tmp_path / f"workers{workers}"
        folder.mkdir()
        recipe = image_recipe(folder, tiny_resnet, image_folder, "strategy.kind=full",
                              "train.epochs=2", f"data.workers={workers}",
                              augment_crop_scale=[0.5, 1.0], augment_flip=True,
                              augment_rotation=10)
        run(recipe, output_dir=str(folder / "run"))
        reset_accelerate_state()
        weights.append(load_file(folder / "run" / "model" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][key].equal(weights[1][key]) for key in weights[0])


def test_the_best_model_restored_keeps_its_batch_norm_statistics(tmp_path, image_folder,
                                                                  tiny_resnet):
    """Restoring the best evaluation's weights restores the running statistics it was
    scored with: metrics.json's validation is the history's best, not a mix of its weights
    and the last step's statistics."""
    from peftlab.train import run
    recipe = image_recipe(tmp_path, tiny_resnet, image_folder, "strategy.kind=full",
                          "train.lr=0.05", "train.eval_every_steps=1",
                          "train.metric_for_best=loss", "train.early_stopping_patience=2")
    summary = run(recipe, output_dir=str(tmp_path / "run"))["summary"]
    reset_accelerate_state()
    assert summary["best_step"] < summary["steps"]  # early stopping: the best is not the last
    best = next(e for e in summary["eval_history"] if e["step"] == summary["best_step"])
    validation = json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]
    assert validation["loss"] == pytest.approx(best["loss"], rel=1e-5)


def trainable(recipe, model_dir: Path, kind: str, *extra) -> set[str]:
    from peftlab.strategies import apply_strategy
    from peftlab.tasks.image_classification import build_image_model
    recipe = load_recipe(recipe.source, [f"strategy.kind={kind}", *extra])
    model = build_image_model(str(model_dir), ["a", "b", "c"], recipe, from_config=False)
    report = apply_strategy(model, recipe)
    return {name for name, p in report.model.named_parameters() if p.requires_grad}


def test_each_strategy_trains_what_it_says_on_vit_and_resnet(tmp_path, image_folder,
                                                             tiny_vit, tiny_resnet):
    recipe = image_recipe(tmp_path, tiny_vit, image_folder)
    assert trainable(recipe, tiny_vit, "head") == {"classifier.weight", "classifier.bias"}
    frozen = trainable(recipe, tiny_vit, "freeze", "strategy.freeze_layers=1")
    assert not any("embeddings" in n or ".layers.0." in n for n in frozen)
    assert any(".layers.1." in n for n in frozen) and "classifier.weight" in frozen
    for kind in ("lora", "dora"):
        names = trainable(recipe, tiny_vit, kind)
        assert any("q_proj.lora_A" in n for n in names) and any("fc1.lora_A" in n or
                                                                "intermediate" in n and "lora_A"
                                                                in n for n in names)
        assert any("modules_to_save" in n and "classifier" in n for n in names)
        assert all("lora_" in n or "modules_to_save" in n for n in names)
    resnet = trainable(recipe, tiny_resnet, "lora")
    assert any("convolution.lora_A" in n for n in resnet)  # peft's Conv2d LoRA
    assert any("modules_to_save" in n and "classifier" in n for n in resnet)
    # batch norms travel with the adapter: their running statistics move while LoRA trains
    assert any("modules_to_save" in n and "normalization" in n for n in resnet)
    frozen = trainable(recipe, tiny_resnet, "freeze", "strategy.freeze_layers=1")
    assert not any("embedder" in n or "stages.0." in n for n in frozen)
    assert any("stages.1." in n for n in frozen)
    assert trainable(recipe, tiny_resnet, "head") == {"classifier.1.weight", "classifier.1.bias"}


def test_qlora_on_a_convolutional_model_is_a_clear_error(tmp_path, image_folder, tiny_resnet):
    from peftlab.tasks.image_classification import prepare
    recipe = image_recipe(tmp_path, tiny_resnet, image_folder, "strategy.kind=qlora")
    with pytest.raises(PeftlabError, match="no linear layers to quantize"):
        prepare(recipe, lambda _: None)


@pytest.fixture(scope="module")
def trained_vit_run(tmp_path_factory, image_folder, tiny_vit) -> tuple[Path, dict]:
    from peftlab.train import run
    folder = tmp_path_factory.mktemp("vit_run")
    recipe = image_recipe(folder, tiny_vit, image_folder, "train.metric_for_best=loss",
                          augment_rotation=5)
    result = run(recipe, output_dir=str(folder / "run"))
    reset_accelerate_state()
    return folder / "run", result


def test_loss_falls_and_the_toy_set_is_learned(trained_vit_run):
    run_dir, result = trained_vit_run
    losses = [point["loss"] for point in result["summary"]["loss_history"]]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 5 / 6  # chance is 1/2 on 6 test images


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftlab", *args], check=False,
                          capture_output=True,
                          text=True, timeout=300)


def test_predict_eval_and_plain_peft_in_fresh_processes_match_the_trained_model(
        trained_vit_run, image_folder, tiny_vit, tmp_path):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from peftlab.artifacts import load_trained
    from peftlab.tasks.image_classification import image_probabilities
    run_dir, _ = trained_vit_run
    images = [str(image_folder / "top" / "00.png"), str(image_folder / "bottom" / "01.png")]
    model, processor, _, info = load_trained(run_dir)
    expected = image_probabilities(model, processor, images)
    names = info["label_names"]
    done = cli("predict", str(run_dir), "--image", images[0], "--image", images[1])
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.strip().splitlines()[-2:]]
    for (label, prob, path), row in zip(lines, expected):
        assert path in images and label == names[int(np.argmax(row))]
        assert float(prob) == pytest.approx(max(row), abs=1e-4)
    table = tmp_path / "unlabelled.csv"  # --file needs no label column
    table.write_text("image\n" + "".join(f"{path}\n" for path in images))
    done = cli("predict", str(run_dir), "--file", str(table), "--output",
               str(tmp_path / "out.csv"))
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "out.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in written] == [label for label, _, _ in lines]
    done = cli("eval", str(run_dir), "--json", str(tmp_path / "eval.json"))
    assert done.returncode == 0, done.stderr
    again = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert again["test"]["accuracy"] == trained["test"]["accuracy"]
    assert again["test"]["loss"] == pytest.approx(trained["test"]["loss"], abs=1e-5)
    # the adapter is plain peft: base + PeftModel.from_pretrained, head included
    base = AutoModelForImageClassification.from_pretrained(
        tiny_vit, num_labels=2, id2label=dict(enumerate(names)), ignore_mismatched_sizes=True)
    plain = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    pixels = AutoImageProcessor.from_pretrained(run_dir / "adapter")(
        images=[processor_image(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        got = plain(pixel_values=pixels).logits.softmax(-1)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-5)
    bad = cli("predict", str(run_dir), "--image", str(image_folder / "top" / "notes.txt"))
    assert bad.returncode == 2 and "notes.txt is not a readable image" in bad.stderr


def processor_image(path: str):
    from peftlab.tasks.image_data import open_image
    return open_image(path, "RGB")


def test_a_model_trained_from_its_config_reloads_with_its_own_base(tmp_path, image_folder,
                                                                   tiny_resnet):
    """No hub holds the random initial weights an adapter over a from-scratch model needs:
    the run keeps them in base/, and eval in a new process scores what training scored."""
    from peftlab.train import run
    recipe = image_recipe(tmp_path, tiny_resnet, image_folder, "model.from_config=true",
                          "train.epochs=2")
    run(recipe, output_dir=str(tmp_path / "run"))
    reset_accelerate_state()
    assert (tmp_path / "run" / "base" / "config.json").is_file()
    done = cli("eval", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json"))
    assert done.returncode == 0, done.stderr
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["test"]["loss"] == pytest.approx(trained["test"]["loss"], abs=1e-5)
    # base/ is the run's own: --overwrite replaces such a run like any other
    run(recipe, output_dir=str(tmp_path / "run"), overwrite=True)
    reset_accelerate_state()
    assert (tmp_path / "run" / "base" / "config.json").is_file()


def test_serve_takes_uploads_and_base64_and_refuses_what_is_not_an_image(
        trained_vit_run, image_folder):
    import httpx
    from test_serve import serving

    from peftlab.serve import ServeLimits, create_app
    run_dir, _ = trained_vit_run
    path = image_folder / "top" / "00.png"
    data = path.read_bytes()
    app = create_app(run_dir, ServeLimits(max_image_bytes=4096, max_inputs=4))
    with serving(app) as url:
        upload = httpx.post(f"{url}/v1/images/classify",
                            files=[("file", ("a.png", data, "image/png"))] * 2)
        assert upload.status_code == 200, upload.text
        results = upload.json()["results"]
        assert len(results) == 2 and results[0] == results[1]
        encoded = httpx.post(f"{url}/v1/images/classify",
                             json={"image": base64.b64encode(data).decode()})
        assert encoded.status_code == 200
        assert encoded.json()["results"][0]["label"] == results[0]["label"]
        assert encoded.json()["results"][0]["score"] == pytest.approx(results[0]["score"],
                                                                      abs=1e-6)
        refused = {
            "text upload": httpx.post(f"{url}/v1/images/classify",
                                      files={"file": ("a.txt", b"hello", "text/plain")}),
            "bad base64": httpx.post(f"{url}/v1/images/classify", json={"image": "%%%"}),
            "too large": httpx.post(f"{url}/v1/images/classify",
                                    files={"file": ("b.png", data + b"\0" * 5000)}),
            "no image": httpx.post(f"{url}/v1/images/classify", json={"images": []}),
            "too many": httpx.post(f"{url}/v1/images/classify",
                                   files=[("file", ("a.png", data, "image/png"))] * 5),
        }
        codes = {name: response.status_code for name, response in refused.items()}
        assert codes == {"text upload": 415, "bad base64": 422, "too large": 413,
                         "no image": 422, "too many": 413}
        assert all("error" in response.json() for response in refused.values())
