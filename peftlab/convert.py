"""llama2.c checkpoints (legacy "version 0" .bin + tokenizer .bin) -> a Hugging Face Llama folder.

Why: Karpathy's tinyllamas (e.g. stories260K) are real pretrained decoders small enough to
fine-tune in seconds on a CPU, but they exist only in llama2.c's binary format. The layout
is documented in ../shared/data/models/stories260K/SOURCE.md and llama2.c's export.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from peftlab.errors import PeftlabError
from peftlab.run_folder import CONVERT_MARKER

HEADER = struct.Struct("<7i")


def _permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama2.c rotates adjacent pairs (x0,x1),(x2,x3)...; HF rotates halves: reorder rows."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_llama2c_model(path: str | Path):
    """(LlamaConfig, state dict) from a llama2.c version-0 float32 checkpoint."""
    from transformers import LlamaConfig
    raw = Path(path).read_bytes()
    if len(raw) < HEADER.size:
        raise PeftlabError(f"{path}: too short for a llama2.c checkpoint")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    tied = vocab > 0
    vocab = abs(vocab)
    floats = np.frombuffer(raw, dtype="<f4", offset=HEADER.size)
    head_dim = dim // heads
    shapes = [("embed", (vocab, dim)), ("rms_att", (layers, dim)),
              ("wq", (layers, dim, dim)), ("wk", (layers, kv_heads * head_dim, dim)),
              ("wv", (layers, kv_heads * head_dim, dim)), ("wo", (layers, dim, dim)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)),
              ("w2", (layers, dim, hidden)), ("w3", (layers, hidden, dim)),
              ("rms_final", (dim,)), ("freq_real", (seq_len, head_dim // 2)),
              ("freq_imag", (seq_len, head_dim // 2))]
    if not tied:
        shapes.append(("classifier", (vocab, dim)))
    need = sum(int(np.prod(shape)) for _, shape in shapes)
    if floats.size < need:
        raise PeftlabError(f"{path}: {floats.size} floats, the header promises {need}")
    arrays, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        arrays[name] = torch.from_numpy(floats[offset:offset + size].copy()).view(shape)
        offset += size
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    state = {"model.embed_tokens.weight": arrays["embed"],
             "model.norm.weight": arrays["rms_final"]}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": arrays["rms_att"][i],
            prefix + "self_attn.q_proj.weight": _permute_rope(arrays["wq"][i], heads),
            prefix + "self_attn.k_proj.weight": _permute_rope(arrays["wk"][i], kv_heads),
            prefix + "self_attn.v_proj.weight": arrays["wv"][i],
            prefix + "self_attn.o_proj.weight": arrays["wo"][i],
            prefix + "post_attention_layernorm.weight": arrays["rms_ffn"][i],
            prefix + "mlp.gate_proj.weight": arrays["w1"][i],
            prefix + "mlp.down_proj.weight": arrays["w2"][i],
            prefix + "mlp.up_proj.weight": arrays["w3"][i],
        }
    state["lm_head.weight"] = arrays["embed"] if tied else arrays["classifier"]
    return config, state


def read_llama2c_tokenizer(path: str | Path, vocab_size: int) -> list[tuple[str, float]]:
    """(piece, score) per id; spaces become the SentencePiece meta symbol '▁'."""
    raw = Path(path).read_bytes()
    offset = 4  # max_token_length
    pieces = []
    try:
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            text = raw[offset:offset + length].decode("utf-8")
            offset += length
            pieces.append((text.replace(" ", "\u2581"), score))
    except (struct.error, UnicodeDecodeError) as err:
        raise PeftlabError(f"{path}: not a llama2.c tokenizer for {vocab_size} tokens ({err})")
    pieces[0], pieces[1], pieces[2] = ("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)
    return pieces


def build_tokenizer(pieces: list[tuple[str, float]]):
    """A fast tokenizer with llama2.c's encoding: BPE merges ranked by the merged piece's
    score, byte fallback for unknown characters, BOS and a leading space prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces[259:]:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[piece], (left, right)))
    merges = [pair for *_, pair in sorted(merges, key=lambda m: (-m[0], m[1]))]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                       fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                 normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                           decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def convert_llama2c(model_path: str | Path, tokenizer_path: str | Path,
                    out_dir: str | Path) -> Path:
    """Write a LlamaForCausalLM folder (safetensors + tokenizer) loadable by transformers."""
    from transformers import LlamaForCausalLM
    for path in (model_path, tokenizer_path):
        if not Path(path).is_file():
            raise PeftlabError(f"{path}: file not found")
    config, state = read_llama2c_model(model_path)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise PeftlabError(f"{model_path}: weights do not fit Llama ({missing[:3]}, "
                           f"{unexpected[:3]})")
    tokenizer = build_tokenizer(read_llama2c_tokenizer(tokenizer_path, config.vocab_size))
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / CONVERT_MARKER).write_text(json.dumps(
        {"source": str(Path(model_path).resolve()), "format": "llama2c"}, indent=2),
        encoding="utf-8")
    return out


def cache_root() -> Path:
    """Where converted models are kept: $PEFTLAB_CACHE, else $XDG_CACHE_HOME/peftlab, else
    ~/.cache/peftlab."""
    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftlab"


def _tokenizer_beside(model_file: Path) -> Path:
    """llama2.c keeps its tokenizer next to the checkpoint: tokenizer.bin, or the one tok*.bin
    (tok512.bin for stories260K)."""
    found = [p for p in sorted(model_file.parent.glob("tok*.bin")) if p != model_file]
    if (model_file.parent / "tokenizer.bin").is_file():
        found = [model_file.parent / "tokenizer.bin"]
    if len(found) != 1:
        raise PeftlabError(f"model.name llama2c:{model_file}: expected one tokenizer.bin or "
                           f"tok*.bin beside it, found {len(found)}")
    return found[0]


def llama2c_model_folder(spec: str, recipe=None) -> str:
    """`model.name: llama2c:PATH.bin` -> a Hugging Face folder converted on first use and
    cached by the checkpoint's and tokenizer's content, so a recipe names the llama2.c files
    directly and no convert step comes first. PATH resolves like a data path ($PEFTLAB_DATA,
    then the recipe's folder, then the working directory)."""
    from peftlab.config import resolve_data_path
    model_file = Path(resolve_data_path(spec, recipe) if recipe is not None else spec)
    if not model_file.is_file():
        raise PeftlabError(f"model.name llama2c:{spec}: checkpoint file not found (relative "
                           f"paths resolve against $PEFTLAB_DATA when set, else the recipe's "
                           f"folder)")
    tokenizer_file = _tokenizer_beside(model_file)
    digest = hashlib.sha256()
    for path in (model_file, tokenizer_file):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    folder = cache_root() / "llama2c" / f"{model_file.stem}-{digest.hexdigest()[:16]}"
    if (folder / CONVERT_MARKER).is_file():
        return str(folder)
    # each process converts into its own folder and renames it into place: two ranks
    # starting together never see a half-written cache
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    try:
        convert_llama2c(model_file, tokenizer_file, partial)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.rename(partial, folder)
    except OSError:
        if not (folder / CONVERT_MARKER).is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)
