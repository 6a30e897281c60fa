"""Tokenized splits by content hash: reused when nothing that decides them changed."""

import datasets
import pytest
from transformers import AutoTokenizer

from peftlab.token_cache import split_key, tokenized


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


def _split(texts, labels=None):
    return datasets.Dataset.from_dict({"text": texts, "label": labels or [0] * len(texts)})


def _counting(tokenizer, max_length, calls):
    def tokenize(split):
        calls.append(len(split))
        return split.map(lambda b: tokenizer(b["text"], truncation=True,
                                             max_length=max_length), batched=True,
                         remove_columns=["text"])
    return tokenize


def test_the_same_content_is_tokenized_once(cache, tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["the movie was great", "an awful film", "it was fine"]
    calls = []
    first = tokenized(_split(texts), tokenizer, 16, _counting(tokenizer, 16, calls))
    again = tokenized(_split(list(texts)), tokenizer, 16, _counting(tokenizer, 16, calls))
    assert calls == [3] and len(list(cache.iterdir())) == 1
    assert again["input_ids"] == first["input_ids"] and again["label"] == first["label"]


def test_anything_that_decides_the_tokens_changes_the_key(tiny_bert, tiny_llama):
    bert = AutoTokenizer.from_pretrained(tiny_bert)
    llama = AutoTokenizer.from_pretrained(tiny_llama)
    base = split_key(_split(["a b", "c d"]), bert, 16)
    assert split_key(_split(["a b", "c d"]), bert, 16) == base
    assert split_key(_split(["a b", "c e"]), bert, 16) != base  # a text
    assert split_key(_split(["a b", "c d"], [0, 1]), bert, 16) != base  # a label
    assert split_key(_split(["a b", "c d"]), bert, 8) != base  # the truncation
    assert split_key(_split(["a b", "c d"]), llama, 16) != base  # the tokenizer
    assert split_key(_split(["a b", "c d", "e f"]).select([0, 1]), bert, 16) == \
        split_key(_split(["a b", "c d"]).flatten_indices(), bert, 16)


def test_a_damaged_cache_entry_is_rebuilt(cache, tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    calls = []
    tokenized(_split(["the movie was great"]), tokenizer, 16, _counting(tokenizer, 16, calls))
    (entry,) = cache.iterdir()
    for arrow in entry.glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    result = tokenized(_split(["the movie was great"]), tokenizer, 16,
                       _counting(tokenizer, 16, calls))
    assert calls == [1, 1] and len(result["input_ids"][0]) > 2
