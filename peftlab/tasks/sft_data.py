"""Supervised fine-tuning data: rows -> rendered text -> token ids with completion-only labels.

Four row formats: alpaca (instruction/input/output), chat (messages of {role, content}, or
ShareGPT conversations of {from, value}), prompt/completion pairs, and plain text. Chat-like
rows are rendered with the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE when it has
none). Only assistant / completion tokens are targets; everything else gets label -100. The
target span is found in characters and mapped to tokens through offsets, so it does not
depend on how the template's pieces tokenize.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import datasets
import torch

from peftlab.batches import IGNORE
from peftlab.config import Recipe
from peftlab.data import read_splits
from peftlab.errors import PeftlabError
from peftlab.token_cache import tokenized

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
FORMAT_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",),
                  "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
                  "text": ("text",)}


def detect_sft_format(columns: list[str], declared: str, where: str) -> str:
    """The declared row format, or the first whose columns the data has."""
    if declared != "auto":
        needed = FORMAT_COLUMNS["sharegpt" if declared == "chat" and "messages" not in columns
                                else declared]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise PeftlabError(f"{where}: data.sft_format {declared} needs column "
                               f"'{missing[0]}' (columns: {', '.join(columns)})")
        return declared
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return "chat" if name == "sharegpt" else name
    raise PeftlabError(f"{where}: cannot tell the SFT format from columns {', '.join(columns)}; "
                       f"expected instruction/output, messages, conversations, "
                       f"prompt/completion or text")


def row_to_messages(row: dict, fmt: str) -> list[dict] | tuple[str, str]:
    """Chat-like formats -> messages; prompt_completion/text -> (prompt, target) strings."""
    if fmt == "alpaca":
        extra = (row.get("input") or "").strip()
        user = row["instruction"].strip() + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": str(row["output"]).strip()}]
    if fmt == "chat":
        turns = row.get("messages") or row.get("conversations") or []
        return [{"role": SHAREGPT_ROLES.get(t.get("role") or t.get("from"), "user"),
                 "content": t.get("content") if "content" in t else t.get("value", "")}
                for t in turns]
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    return "", row["text"]


def render(tokenizer, example, fmt: str) -> tuple[str, list[tuple[int, int]]]:
    """(text, target character spans); the text always ends with EOS, itself a target."""
    eos = tokenizer.eos_token or ""
    if fmt in ("prompt_completion", "text"):
        prompt, target = example
        text = prompt + target
        spans = [(len(prompt), len(text) + len(eos))]
        return text + eos, spans
    text, spans = "", []
    for i, message in enumerate(example):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(example[:i], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(example[:i + 1], tokenize=False)
        if not full.startswith(prefix):
            raise PeftlabError("the model's chat template renders a conversation differently "
                               "from its prefix; set data.sft_format: prompt_completion")
        spans.append((len(prefix), len(full)))
        text = full
    if not spans:
        return "", []
    if eos and not text.endswith(eos):
        spans[-1] = (spans[-1][0], len(text) + len(eos))
        text += eos
    return text, spans


def encode(tokenizer, text: str, spans: list[tuple[int, int]], max_length: int) -> dict:
    """Token ids + labels: a token is a target when it starts inside a target span."""
    add_bos = bool(tokenizer.bos_token) and not text.startswith(tokenizer.bos_token)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        truncation=True, max_length=max_length - int(add_bos))
    ids, labels = list(encoded["input_ids"]), []
    for token, (start, end) in zip(ids, encoded["offset_mapping"]):
        inside = any(a <= start < b for a, b in spans) and end > start
        labels.append(token if inside else IGNORE)
    if add_bos:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    return {"input_ids": ids, "labels": labels}


@dataclass
class SftData:
    splits: datasets.DatasetDict  # input_ids, labels (and position_ids when packed)
    fmt: str
    prompts: list  # the first validation prompts, for sample generations
    report: dict


def _split_off(rows: dict[str, list], recipe: Recipe) -> dict[str, list]:
    """Seeded random validation/test split of train rows when the recipe gives none."""
    train_ratio, val_ratio, test_ratio = recipe.data.split_ratios
    for split, ratio in (("test", test_ratio), ("validation", val_ratio)):
        if split in rows or ratio <= 0:
            continue
        share = ratio / (train_ratio + ratio) if split == "validation" or "validation" in rows \
            else ratio
        order = list(range(len(rows["train"])))
        random.Random(recipe.train.seed).shuffle(order)
        cut = max(1, round(share * len(order)))
        if cut >= len(order):
            raise PeftlabError(f"data.train: too few rows to split off a {split} set")
        rows[split] = [rows["train"][i] for i in order[:cut]]
        rows["train"] = [rows["train"][i] for i in sorted(order[cut:])]
    return rows


def _encode_split(tokenizer, fmt: str, max_length: int):
    """Rows -> rendered, tokenized examples, dropping those left without a target token."""
    def encode_rows(rows: datasets.Dataset) -> datasets.Dataset:
        encoded = (encode(tokenizer, *render(tokenizer, row_to_messages(row, fmt), fmt),
                          max_length) for row in rows)
        kept = [e for e in encoded if any(label != IGNORE for label in e["labels"][1:])]
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                      "labels": datasets.Sequence(datasets.Value("int64"))})
        return datasets.Dataset.from_list(kept, features=features)
    return encode_rows


def load_sft_data(recipe: Recipe, tokenizer) -> SftData:
    """Read, render and tokenize every split; rows without a target token are dropped.

    Rendering and tokenizing go through the content-hash token cache (token_cache.py), keyed
    also on the row format and the chat template, which the tokenizer's JSON does not hold:
    a second run on the same file loads the token ids instead of rendering them again."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    raw = read_splits(recipe)
    fmt = detect_sft_format(raw["train"].column_names, recipe.data.sft_format, "data.train")
    chosen = _split_off({split: list(range(len(ds))) for split, ds in raw.items()}, recipe)
    rows = {split: raw["train" if split not in raw else split].select(indices)
            for split, indices in chosen.items()}
    max_length = recipe.model.max_length
    variant = f"sft:{fmt}:{tokenizer.chat_template}"
    splits, report = {}, {}
    for split, split_rows in rows.items():
        kept = tokenized(split_rows, tokenizer, max_length,
                         _encode_split(tokenizer, fmt, max_length), variant)
        report[split] = {"rows": len(split_rows), "kept": len(kept),
                         "no_target_after_truncation": len(split_rows) - len(kept)}
        if not len(kept):
            raise PeftlabError(f"data.{split}: no example keeps a target token within "
                               f"model.max_length={max_length}")
        if split == "train":
            kept = _subset(kept, recipe.data.max_train_samples, recipe.train.seed)
            report[split]["used"] = len(kept)
            if recipe.data.packing:
                kept = datasets.Dataset.from_list(pack(kept.to_list(), max_length))
                report[split]["packed_rows"] = len(kept)
        splits[split] = kept
    prompts = [row_to_messages(row, fmt) for row in rows["validation"].select(
        range(min(3, len(rows["validation"]))))]
    return SftData(datasets.DatasetDict(splits), fmt, prompts, report)


def _subset(examples: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """data.max_train_samples: a seeded random choice of examples (before any packing, so
    the count is of examples, not packed rows), kept in file order."""
    if not count or count >= len(examples):
        return examples
    return examples.select(sorted(random.Random(seed).sample(range(len(examples)), count)))


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate whole examples into rows of at most max_length tokens.

    position_ids restart at 0 for every example, and the first token of each example is never
    a target, so no loss crosses a boundary. Packed batches carry no attention mask (see
    collate_sft), which is what makes transformers build a per-example causal mask from the
    position_ids on every attention kernel: no example attends to another.
    """
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        n = len(example["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += [IGNORE] + example["labels"][1:]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows


def collate_sft(pad_token_id: int):
    """Right-pad ids with the pad token and labels with -100. Unpacked rows get an attention
    mask. Packed rows get none: transformers then derives one causal block per example from
    the position_ids (which restart at 0 for each example, and for the padding), as long as
    no KV cache is built (the loss runs with use_cache=False)."""
    def collate(batch: list[dict]) -> dict:
        width = max(len(example["input_ids"]) for example in batch)
        packed = "position_ids" in batch[0]
        out = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
        for example in batch:
            pad = width - len(example["input_ids"])
            out["input_ids"].append(example["input_ids"] + [pad_token_id] * pad)
            out["labels"].append(example["labels"] + [IGNORE] * pad)
            if packed:
                out["position_ids"].append(example["position_ids"] + list(range(pad)))
            else:
                out["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}
    return collate
