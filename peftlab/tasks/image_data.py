"""Image classification data: a folder of class subfolders, a table of image paths (CSV,
JSON/JSONL, Parquet), a `datasets` folder with an Image column, or MNIST-style IDX files,
turned into labelled splits of image references (a path, encoded bytes or a pixel array).

Images are only opened here to check that they decode (`data.bad_images`: a one-line error
naming the file, or skip and count); the pixels are decoded again per epoch by the
DataLoader's workers (image_loading.py), so memory holds references, not images.
"""

from __future__ import annotations

import gzip
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from peftlab.config import Recipe, resolve_data_path
from peftlab.data import SPLITS, random_rows, stratified_split
from peftlab.errors import PeftlabError
from peftlab.sources import pick_split, read_source
from peftlab.tasks.classification_data import (
    _clean_label,
    _labels_index_names,
    _to_ids,
    label_vocabulary,
    split_missing,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
IDX_IMAGES, IDX_LABELS = 2051, 2049  # the IDX magic numbers of images and labels


@dataclass
class ImageData:
    splits: dict[str, dict]  # split -> {"image": references, "labels": class ids}
    label_names: list[str]
    report: dict


def open_image(ref, mode: str):
    """A PIL image in `mode` ("RGB" or "L") from a path, encoded bytes or a pixel array:
    grayscale, palette and RGBA images are converted to what the model expects."""
    from PIL import Image
    if isinstance(ref, np.ndarray):
        image = Image.fromarray(ref)
    else:
        image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
    if image.mode in ("RGBA", "LA", "P") and mode == "RGB":  # transparency onto white
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert(mode)


def _decodes(ref) -> bool:
    try:
        open_image(ref, "RGB").load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means a bad file
        return False


def _name(ref) -> str:
    return ref if isinstance(ref, str) else "an embedded image"


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array: images (n, rows, cols) or labels (n,)."""
    try:
        with _open_idx(path) as handle:
            raw = handle.read()
        magic, count = struct.unpack(">II", raw[:8])
        if magic == IDX_IMAGES:
            rows, cols = struct.unpack(">II", raw[8:16])
            return np.frombuffer(raw, np.uint8, count * rows * cols, 16).reshape(
                count, rows, cols)
        if magic == IDX_LABELS:
            return np.frombuffer(raw, np.uint8, count, 8)
    except (OSError, EOFError, struct.error, ValueError) as err:
        raise PeftlabError(f"{path}: not a readable IDX file ({err})") from None
    raise PeftlabError(f"{path}: not an IDX images or labels file (magic {magic})")


def _idx_pair(path: Path) -> tuple[Path, Path] | None:
    """(images, labels) files of an IDX folder or of its images file."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    images = [f for f in files if "idx3-ubyte" in f.name]
    if not images:
        return None
    labels = images[0].parent / images[0].name.replace("images-idx3", "labels-idx1")
    if not labels.exists():
        raise PeftlabError(f"{images[0]}: no labels file beside it ({labels.name})")
    return images[0], labels


def _read_idx_split(images: Path, labels: Path) -> dict:
    pixels, ids = read_idx(images), read_idx(labels)
    if len(pixels) != len(ids):
        raise PeftlabError(f"{images}: {len(pixels)} images but {labels.name} has "
                           f"{len(ids)} labels")
    return {"image": list(pixels), "label": [str(int(i)) for i in ids]}


def _read_image_folder(path: Path) -> dict:
    """One subfolder per class; files that are not images by their suffix are ignored."""
    classes = sorted(d for d in path.iterdir() if d.is_dir())
    if not classes:
        raise PeftlabError(f"{path}: an image folder needs one subfolder per class")
    out = {"image": [], "label": []}
    for folder in classes:
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                out["image"].append(str(file))
                out["label"].append(folder.name)
    if not out["image"]:
        raise PeftlabError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                           f"in its class subfolders")
    return out


def _image_values(dataset: datasets.Dataset, column: str, base: Path) -> list:
    """An Image column's encoded bytes (or file paths), or a column of paths relative to
    the table's folder."""
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.Image):
        raw = dataset.cast_column(column, datasets.Image(decode=False))[column]
        return [item["bytes"] if item.get("bytes") else item["path"] for item in raw]
    values = dataset[column]
    return [str(base / v) if isinstance(v, str) and v and not Path(v).is_absolute()
            else v for v in values]


def _read_table(path: str, recipe: Recipe, where: str, labelled: bool) -> dict:
    """A table's images and labels; `labelled=False` (predict) reads labels only if there."""
    source = read_source(path, recipe.data.format, recipe.data.image_column,
                         recipe.data.label_column)
    if isinstance(source, datasets.DatasetDict):
        source = pick_split(source, "train", path) or next(iter(source.values()))
    data = recipe.data
    needed = ((data.image_column, "image_column"),) + (
        ((data.label_column, "label_column"),) if labelled else ())
    for column, key in needed:
        if column not in source.column_names:
            raise PeftlabError(f"{where}: no column '{column}' (columns: "
                               f"{', '.join(source.column_names)}); map it with data.{key}")
    base = Path(path).parent if Path(path).is_file() else Path(path)
    labels = list(source[data.label_column]) if data.label_column in source.column_names \
        else [None] * len(source)
    return {"image": _image_values(source, data.image_column, base), "label": labels}


def _is_image_folder(path: Path) -> bool:
    return path.is_dir() and not any((path / name).exists() for name in (
        "dataset_dict.json", "dataset_info.json", "state.json"))


def read_images(path: str, recipe: Recipe, where: str, labelled: bool = True) -> dict:
    """One source's {image: references, label: raw labels (None where unlabelled)}."""
    target = Path(path)
    if not target.exists():
        raise PeftlabError(f"{where}: not found (relative paths resolve against $PEFTLAB_DATA "
                           f"when set, else the recipe's folder)")
    if recipe.data.format in ("auto", "idx") and (pair := _idx_pair(target)):
        return _read_idx_split(*pair)
    if recipe.data.format in ("auto", "imagefolder") and _is_image_folder(target):
        return _read_image_folder(target)
    return _read_table(path, recipe, where, labelled)


def clean_images(columns: dict, recipe: Recipe, where: str) -> tuple[dict, dict]:
    """Drop rows without a label; check each file image decodes (bad_images: error names
    the file, skip counts it). Returns the columns and the split's report."""
    out, dropped = {"image": [], "label": []}, {"missing_label": 0, "bad_image": 0}
    for ref, raw in zip(columns["image"], columns["label"]):
        label = _clean_label(raw, recipe)
        if label is None:
            dropped["missing_label"] += 1
            continue
        if not isinstance(ref, np.ndarray) and (not ref or not _decodes(ref)):
            if recipe.data.bad_images == "error":
                raise PeftlabError(f"{where}: {_name(ref) or 'an empty image path'} is not a "
                                   f"readable image (missing or corrupt); fix or remove it, "
                                   f"or set data.bad_images: skip")
            dropped["bad_image"] += 1
            continue
        out["image"].append(ref)
        out["label"].append(label)
    return out, {"rows": len(columns["label"]), "kept": len(out["label"]), **dropped}


def load_image_data(recipe: Recipe) -> ImageData:
    """Read, check, label and split the recipe's images (seeded, stratified when missing)."""
    columns, report = {}, {}
    for split in SPLITS:
        value = getattr(recipe.data, split)
        if value:
            where = f"data.{split} ({value})"
            raw = read_images(resolve_data_path(value, recipe), recipe, where)
            columns[split], report[split] = clean_images(raw, recipe, where)
    train = columns["train"]["label"]
    if len(set(train)) < 2:
        raise PeftlabError(f"data.train ({recipe.data.train}): needs images of at least two "
                           f"classes, found {len(set(train))}")
    names = label_vocabulary(train, recipe)
    numeric = _labels_index_names(recipe, train)
    ids = {s: _to_ids(c, names, numeric, f"data.{s}", recipe) for s, c in columns.items()}
    ids = split_missing(ids, recipe, report)
    splits = limit_splits(ids, recipe)
    for split in splits:
        report.setdefault(split, {})["used"] = len(splits[split]["labels"])
    return ImageData(splits=splits, label_names=names, report=report)


def limit_splits(ids: dict[str, dict], recipe: Recipe) -> dict[str, dict]:
    """data.max_train_samples (seeded random) and max_eval_samples (seeded, stratified)."""
    data, seed = recipe.data, recipe.train.seed
    out = {"train": random_rows(ids["train"], data.max_train_samples, seed)}
    for split in ("validation", "test"):
        if split not in ids:
            continue
        rows, labels = ids[split], ids[split]["labels"]
        if data.max_eval_samples and len(labels) > data.max_eval_samples:
            _, taken = stratified_split(len(labels), labels, data.max_eval_samples, seed)
            rows = {k: [v[i] for i in sorted(taken)] for k, v in rows.items()}
        out[split] = rows
    return out


def format_image_report(data: ImageData) -> str:
    lines = [f"labels ({len(data.label_names)}): {', '.join(data.label_names)}"]
    for split in SPLITS:
        info = data.report.get(split, {})
        if "split_from_train" in info:
            lines.append(f"{split}: {info['used']} images (split off train, stratified)")
        elif info:
            dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in info.items()
                                if k in ("missing_label", "bad_image") and v)
            lines.append(f"{split}: {info['rows']} images read, {info['used']} used"
                         + (f" (skipped: {dropped})" if dropped else ""))
    return "\n".join(lines)


def memory_bytes(recipe: Recipe) -> float:
    """Planner: what the read splits hold in the training process. IDX pixels are decoded
    in memory (from the file's header: count x rows x cols); a `datasets` folder's Image
    column embeds encoded bytes (its size on disk); file paths count as nothing, since the
    workers decode each image on access."""
    total = 0.0
    for value in (recipe.data.train, recipe.data.validation, recipe.data.test):
        path = Path(resolve_data_path(value, recipe)) if value else None
        if path is None or not path.exists():
            continue
        if pair := _idx_pair(path):
            with _open_idx(pair[0]) as handle:
                _, count, rows, cols = struct.unpack(">IIII", handle.read(16))
            total += count * rows * cols
        elif path.is_dir() and not _is_image_folder(path):
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total
