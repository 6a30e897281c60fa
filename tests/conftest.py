"""Tiny models, tokenizers and datasets built locally in seconds; nothing leaves the machine."""

from __future__ import annotations

import csv
import os
import random
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# converted models and tokenized splits go to a cache of this test session, not the user's
os.environ.setdefault("PEFTLAB_CACHE", tempfile.mkdtemp(prefix="peftlab-test-cache-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import yaml

POSITIVE = ["good", "great", "lovely", "excellent", "superb", "fine", "wonderful", "happy", "nice", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "horrible", "sad", "ugly", "boring", "dreadful", "nasty"]
NEUTRAL = ["the", "movie", "film", "story", "plot", "actor", "scene", "was", "is", "really", "quite", "very", "a", "an", "this", "that", "it", "with", "and", "of", "music", "ending", "show"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
REPO = Path(__file__).resolve().parent.parent


def make_sentence(rng: random.Random, label: str) -> str:
    words = rng.sample(NEUTRAL, rng.randint(3, 7))
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else
                                                           NEGATIVE))
    return " ".join(words)


def write_rows(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    labels = ["pos", "neg"] * (n // 2)
    return [{"text": make_sentence(rng, label), "label": label} for label in labels]


def reset_accelerate_state() -> None:
    """Each run builds its own Accelerator; the library keeps a process-wide singleton."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with a word-level vocabulary of the test words."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"),
                          SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL)))


def save_tiny_bert(folder: Path, vocab: list[str], hidden: int = 32, heads: int = 2,
                   positions: int = 64) -> Path:
    """A 2-layer BERT without dropout and a WordPiece tokenizer of `vocab`, seeded."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=positions, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """400 learnable rows: the label is the polarity of the one sentiment word."""
    return write_rows(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows(400))


TINY_BERT_HUB_ID = "tester/tiny-bert"  # what publish calls tiny_bert (tests host it there)


@pytest.fixture(scope="session")
def learned_lora_run(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    """A LoRA classifier of tiny_bert that learned the sentiment rows (>= 0.8 test accuracy,
    so its probabilities differ from text to text), for publish and serve."""
    from peftlab.config import load_recipe
    from peftlab.train import run
    folder = tmp_path_factory.mktemp("learned_lora")
    recipe = load_recipe(write_recipe(
        folder / "r.yaml", tiny_bert, sentiment_csv,
        model={"hub_id": TINY_BERT_HUB_ID, "max_length": 16},
        train={"lr": 3e-3, "epochs": 10, "mixed_precision": "no"},
        output={"license": "mit"}))
    result = run(recipe, output_dir=str(folder / "run"))
    reset_accelerate_state()
    assert result["metrics"]["test"]["accuracy"] >= 0.8
    return folder / "run"


def write_recipe(path: Path, model_path: Path, train_file: Path, **sections) -> Path:
    """A recipe for the tiny model; `sections` override whole keys, e.g. strategy={...}."""
    recipe = {
        "model": {"name": str(model_path), "max_length": 16},
        "data": {"train": str(train_file)},
        "strategy": {"kind": "lora", "lora_r": 4},
        "train": {"epochs": 4, "batch_size": 16, "lr": 2e-2, "log_every_steps": 5,
                  "mixed_precision": "no", "report_to": ["none"]},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture
def recipe_file(tmp_path, tiny_bert, sentiment_csv) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_bert, sentiment_csv)


def word_tokenizer(folder: Path, pad: bool):
    """A word-level fast tokenizer with <s>/</s>/<unk> (and no pad token, like most decoders)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else []) + sorted(
        set(POSITIVE + NEGATIVE + NEUTRAL))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        **({"pad_token": "<pad>"} if pad else {}))
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama (GQA, tied embeddings) whose tokenizer has no pad token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = word_tokenizer(folder, pad=False)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = word_tokenizer(folder, pad=False)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                        n_positions=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
