"""Publish a finished run to a model hub: the adapter (or merged model), its tokenizer, the
resolved recipe, metrics.json, summary.json and a model card, in one commit.

Everything is staged in a folder first, so `--dry-run OUT` writes exactly what would be
uploaded, and every check (the base model's hub id above all) happens before the first
request. The token is huggingface_hub's own (HF_TOKEN or its login store): peftlab never
reads, prints or writes it, and scrubs it from any error the hub sends back.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from peftlab.artifacts import read_run
from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.model_card import build_card
from peftlab.run_folder import MERGE_MARKER

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
RUN_FILES = ("recipe.yaml", "metrics.json", "summary.json")


@dataclass
class PublishRequest:
    run_dir: Path
    repo_id: str
    private: bool = False
    merged: bool = False
    revision: str | None = None
    dry_run: Path | None = None


def base_hub_id(recipe: Recipe) -> str:
    """The hub id of the run's base model, never a local path: model.hub_id, else the name
    when it is a hub id, else the one hub id a `pkg:` package's summary names."""
    model = recipe.model
    if model.hub_id:
        if not HUB_ID.fullmatch(model.hub_id):
            raise PeftlabError(f"model.hub_id {model.hub_id}: not a hub id (OWNER/NAME)")
        return model.hub_id
    name = model.name
    if name.startswith("pkg:"):
        package = name[4:].partition("/")[0]
        try:
            dist = metadata.distribution(package.replace("_", "-"))
            named = set(HUB_ID.findall(dist.metadata.get("Summary") or ""))
        except metadata.PackageNotFoundError:
            named = set()
        if len(named) == 1:
            return named.pop()
    elif HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    raise PeftlabError(f"model.name {name}: cannot tell the base model's hub id; set "
                       f"model.hub_id: OWNER/NAME in the run's recipe.yaml (or pass "
                       f"--base-model OWNER/NAME)")


def _stage_artifact(run_dir: Path, info: dict, merged: bool, hub_id: str, out: Path) -> str:
    """The weights and tokenizer in `out`; returns what they are (adapter, merged, full)."""
    if info.get("pooling") == "mean":
        raise PeftlabError(f"{run_dir}: a mean-pooled head has no transformers class to load "
                           f"it with; train with model.pooling: cls to publish")
    if merged:
        if info["artifact"] != "adapter":
            raise PeftlabError(f"{run_dir}: --merged needs an adapter run; this run's model/ "
                               f"is already a full model")
        from peftlab.export import merge_run
        merge_run(run_dir, out)
        (out / MERGE_MARKER).unlink()  # names this machine's folders
        return "merged"
    source = run_dir / info["artifact"]
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != "README.md":  # peft's stub card: ours replaces it
            shutil.copy2(path, out / path.name)
    if info["artifact"] != "adapter":
        return "full"
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id  # so PeftModel.from_pretrained finds it
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return "adapter"


def stage(request: PublishRequest, out: Path, base_model: str | None = None) -> Path:
    """Write into `out` (empty) every file the upload would hold."""
    recipe, info = read_run(request.run_dir)
    if base_model:
        recipe.model.hub_id = base_model
    hub_id = base_hub_id(recipe)
    what = _stage_artifact(request.run_dir, info, request.merged, hub_id, out)
    for name in RUN_FILES:
        if (request.run_dir / name).is_file():
            shutil.copy2(request.run_dir / name, out / name)
    card = build_card(recipe, info, request.run_dir, request.repo_id, hub_id, what)
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def _dry_run_folder(path: Path) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PeftlabError(f"--dry-run {path}: exists and is not an empty folder; pick a new "
                           f"path (nothing is overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _hub_error(err: Exception, token: str | None, what: str) -> PeftlabError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        text = (f"publish: the hub rejected the token (401) while {what}; set HF_TOKEN to a "
                f"token with write access or run `hf auth login`")
    else:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        text = f"publish: {what} failed ({first})"
    return PeftlabError(text.replace(token, "***") if token else text)


def publish(request: PublishRequest, base_model: str | None = None) -> str:
    """Stage, then create the repo (exist_ok), the branch when asked, and upload the folder
    in one commit; returns the commit URL, or the dry-run folder."""
    if not HUB_ID.fullmatch(request.repo_id):
        raise PeftlabError(f"--repo-id {request.repo_id}: not a repo id (OWNER/NAME)")
    if request.dry_run is not None:
        return str(stage(request, _dry_run_folder(request.dry_run), base_model))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_token
    token = get_token()
    if not token:
        raise PeftlabError("publish: no hub token; set HF_TOKEN or run `hf auth login`")
    with tempfile.TemporaryDirectory(prefix="peftlab-publish-") as folder:
        staged = stage(request, Path(folder), base_model)
        api = HfApi()
        what = f"creating {request.repo_id}"
        try:
            api.create_repo(request.repo_id, private=request.private, exist_ok=True)
            if request.revision:
                what = f"creating branch {request.revision}"
                api.create_branch(request.repo_id, branch=request.revision, exist_ok=True)
            what = f"uploading to {request.repo_id}"
            commit = api.upload_folder(repo_id=request.repo_id, folder_path=staged,
                                       revision=request.revision,
                                       commit_message="Upload a peftlab run")
        except HfHubHTTPError as err:
            raise _hub_error(err, token, what) from None
    return commit.commit_url if hasattr(commit, "commit_url") else str(commit)
