"""Tokenized splits kept by content hash, so the same data is tokenized once, not per run.

A short run on a large file (60 steps on SST-2's 67k rows) used to spend seconds tokenizing
rows it never trains on, again at every run. The key is a hash of what decides the result:
the split's Arrow buffers (every column, as read and cleaned), the tokenizer's full JSON, the
truncation length and a version of this code. The value is the tokenized split saved with
`datasets`' save_to_disk; loading it back memory-maps the Arrow file. Where: $PEFTLAB_CACHE
(else $XDG_CACHE_HOME/peftlab, else ~/.cache/peftlab), under tokenized/; safe to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa

from peftlab.convert import cache_root

VERSION = "1"  # bump when what a tokenized split holds changes


def split_key(split: datasets.Dataset, tokenizer, max_length: int,
              variant: str = "") -> str | None:
    """The content hash of (split, tokenizer, max_length, variant); None when the tokenizer
    has no serialised form to hash (a slow tokenizer), and nothing is cached. `variant` names
    whatever else the tokenize function depends on (a task's options)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256()
    # truncation/padding are call settings the backend remembers from its last call
    setup = {k: v for k, v in json.loads(backend.to_str()).items()
             if k not in ("truncation", "padding")}
    for part in (VERSION, variant, type(tokenizer).__name__, str(max_length),
                 json.dumps(setup, sort_keys=True),
                 repr(sorted(tokenizer.special_tokens_map.items())),
                 repr(split.column_names), str(len(split))):
        digest.update(part.encode("utf-8") + b"\0")
    # the rows as Arrow's IPC stream writes them: exact values, zeroed padding (the raw
    # buffers carry uninitialised padding bytes)
    digest.update(repr(split.features).encode("utf-8"))
    table = split.flatten_indices().data.table if split._indices is not None \
        else split.data.table
    # compact copies (a contiguous select is a slice whose buffers start before it), without
    # datasets' info in the schema, which is no content (the features are hashed above)
    table = table.take(pa.array(range(table.num_rows))).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(memoryview(sink.getvalue()))
    return digest.hexdigest()


def tokenized(split: datasets.Dataset, tokenizer, max_length: int,
              tokenize: Callable[[datasets.Dataset], datasets.Dataset],
              variant: str = "") -> datasets.Dataset:
    """`tokenize(split)`, or the saved result of the same call on the same content."""
    key = split_key(split, tokenizer, max_length, variant)
    if key is None or os.environ.get("PEFTLAB_TOKEN_CACHE") == "0":
        return tokenize(split)
    folder = cache_root() / "tokenized" / key
    if (folder / "dataset_info.json").exists():
        try:
            return datasets.load_from_disk(str(folder))
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # damaged: tokenize again
    result = tokenize(split)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key[:12]}-"))
        result.save_to_disk(str(staging))
        try:
            staging.rename(folder)  # atomic: another process may have won the race
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass  # a read-only or full cache only costs the time saved
    return result
