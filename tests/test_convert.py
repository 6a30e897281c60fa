"""stories260K (llama2.c) -> Hugging Face Llama: weights and tokenizer reproduce llama2.c."""

import os
import struct
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from peftlab.cli import main

STORIES = Path(os.environ.get("PEFTLAB_DATA", Path(__file__).resolve().parents[2] / "shared"
                              / "data")) / "models" / "stories260K"
REFERENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
             "in the park. One day, she saw a big, red ball. She wanted to play with it, but it "
             "was too high.\nLily's mom said, \"Lily, let's go to the park.\" Lily was sad and "
             "didn't know what to do.")

pytestmark = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(),
                                reason="needs ../shared/data/models/stories260K")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories260K")
    assert main(["convert", "llama2c", str(STORIES / "stories260K.bin"),
                 str(STORIES / "tok512.bin"), str(out), "--overwrite"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out), out


def test_greedy_generation_from_bos_reproduces_the_reference_story(stories):
    model, tokenizer, _ = stories
    generated = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=110,
                               do_sample=False)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    assert text.startswith(REFERENCE), text


def read_pieces() -> tuple[list[str], list[float]]:
    raw = (STORIES / "tok512.bin").read_bytes()
    offset, pieces, scores = 4, [], []
    for _ in range(512):
        score, length = struct.unpack_from("<fi", raw, offset)
        pieces.append(raw[offset + 8:offset + 8 + length].decode())
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def llama2c_encode(text: str) -> list[int]:
    """llama2.c run.c's encoder: BOS, a leading space, characters (bytes + 3 when unknown),
    then merge the adjacent pair whose concatenation has the best score, until none fits."""
    pieces, scores = read_pieces()
    vocab = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)
    ids = []
    for char in " " + text:
        ids += [vocab[char]] if char in vocab else [byte + 3 for byte in char.encode()]
    while True:
        candidates = [(scores[vocab[pieces[a] + pieces[b]]], -i) for i, (a, b)
                      in enumerate(pairwise(ids)) if pieces[a] + pieces[b] in vocab]
        if not candidates:
            return [1] + ids
        i = -max(candidates)[1]
        ids[i:i + 2] = [vocab[pieces[ids[i]] + pieces[ids[i + 1]]]]


@pytest.mark.parametrize("text", [
    "Once upon a time, there was a little girl named Lily.",
    "The dog said: \"I can't find my ball!\" and ran away.",
    "Tom went to the park with 3 friends; café au lait?",
])
def test_tokenizer_encodes_like_llama2c(stories, text):
    _, tokenizer, _ = stories
    assert tokenizer(text)["input_ids"] == llama2c_encode(text)
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_convert_rejects_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 10)
    assert main(["convert", "llama2c", str(bad), str(STORIES / "tok512.bin"),
                 str(tmp_path / "out")]) == 2
    assert "too short" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_stories260k_sft_lowers_held_out_loss(stories, tmp_path, kind):
    """A real pretrained decoder fine-tuned on short stories in a new style: every story
    ends with the same moral. Held-out loss must fall."""
    import json

    from conftest import reset_accelerate_state, write_recipe

    from peftlab.config import load_recipe
    from peftlab.train import run
    names = ["Tom", "Lily", "Sam", "Mia", "Ben", "Sue"]
    things = ["ball", "cat", "kite", "cake", "toy", "dog"]
    rows = [{"prompt": f"{n} had a {t}.", "completion": f" {n} shared the {t} with a friend. "
             f"The moral is: sharing is caring."} for n in names for t in things]
    data = tmp_path / "stories.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", stories[2], data, model={"task": "causal_lm", "max_length": 64},
        strategy={"kind": kind, "lora_r": 8}, eval={"max_new_tokens": 12},
        train={"epochs": 3, "batch_size": 4, "lr": 5e-3 if kind == "lora" else 1e-3}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    reset_accelerate_state()
    history = result["summary"]["eval_history"]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], history


def test_a_recipe_names_the_llama2c_files_and_they_are_converted_once(tmp_path, monkeypatch,
                                                                      stories):
    """`model.name: llama2c:models/stories260K/stories260K.bin` resolves like a data path
    and converts into a cache keyed by the files' content: no convert step before a run."""
    from peftlab.config import recipe_from_dict
    from peftlab.models import resolve_model_path
    monkeypatch.setenv("PEFTLAB_DATA", str(STORIES.parent.parent))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    recipe = recipe_from_dict({"model": {"name": "llama2c:models/stories260K/stories260K.bin"},
                               "data": {"train": "x.json"}})
    folder = Path(resolve_model_path(recipe.model.name, recipe))
    assert folder.parent == tmp_path / "cache" / "llama2c"
    converted = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(recipe.model.name, recipe) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == converted  # not again
    reference = stories[2] / "model.safetensors"
    from safetensors.torch import load_file
    ours, theirs = load_file(folder / "model.safetensors"), load_file(reference)
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_a_missing_llama2c_file_or_local_model_folder_is_named(tmp_path, monkeypatch):
    from peftlab.config import recipe_from_dict
    from peftlab.errors import PeftlabError
    from peftlab.models import resolve_model_path
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict({"model": {"name": "llama2c:nowhere/model.bin"},
                               "data": {"train": "x.json"}})
    with pytest.raises(PeftlabError, match="checkpoint file not found"):
        resolve_model_path(recipe.model.name, recipe)
    (tmp_path / "models").mkdir()  # clearly meant locally: never sent to the hub
    with pytest.raises(PeftlabError, match="model folder does not exist.*llama2c:"):
        resolve_model_path("models/stories260K")
