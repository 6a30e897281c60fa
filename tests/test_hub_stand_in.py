"""The Hub stand-in (tests/hub_stand_in.py) against the real, unmodified huggingface_hub client."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest
from hub_stand_in import StandInHub, point_huggingface_hub_at

TOKEN = "hf_test_token"
REPO = "tester/demo"


@pytest.fixture
def hub(monkeypatch):
    """A running stand-in, with huggingface_hub pointed at it and holding a valid token.

    The conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, and huggingface_hub
    copies its env vars into `huggingface_hub.constants` at import time, so monkeypatching the
    environment alone would leave it offline and aimed at huggingface.co:
    `point_huggingface_hub_at` patches the constants too (see its docstring for each one), and
    disables Xet and telemetry (the agent-detection request). monkeypatch undoes all of it.
    """
    with StandInHub(tokens={TOKEN}) as server:
        point_huggingface_hub_at(monkeypatch, server.url, token=TOKEN)
        # Quiet test output: the progress-bar switch is also a copy made at import time.
        monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"),
                            "HF_HUB_DISABLE_PROGRESS_BARS", True)
        yield server
    assert server.errors == [], server.errors[0]


def make_folder(folder: Path, text: str, weights: bytes) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"README.txt": text.encode(), "adapter_model.safetensors": weights,
             "nested/config.json": b'{"r": 8}\n'}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def snapshot_bytes(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def weights(seed: int) -> bytes:
    return random.Random(seed).randbytes(2 * 1024 * 1024)  # ~2 MB binary, not valid UTF-8


def test_upload_to_main_and_branch_then_snapshot_download(hub, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=hub.url, token=TOKEN)
    url = api.create_repo(REPO, private=True, exist_ok=True)
    assert url.repo_id == REPO and url == f"{hub.url}/{REPO}"
    assert api.create_repo(REPO, private=True, exist_ok=True).repo_id == REPO  # 409 -> exist_ok
    assert hub.repos[REPO]["private"] is True

    main_files = make_folder(tmp_path / "main", "hello main\n", weights(0))
    commit = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "main", commit_message="first upload")
    assert commit.oid == hub.head(REPO) and commit.commit_url == f"{hub.url}/{REPO}/commit/{commit.oid}"
    assert hub.repos[REPO]["revisions"]["main"] == main_files
    assert hub.repos[REPO]["commits"][-1]["title"] == "first upload"

    api.create_branch(REPO, branch="experiment", exist_ok=True)
    api.create_branch(REPO, branch="experiment", exist_ok=True)  # 409 -> exist_ok
    branch_files = make_folder(tmp_path / "branch", "hello branch\n", weights(1))
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "branch", commit_message="on a branch",
                      revision="experiment")
    assert hub.repos[REPO]["revisions"]["experiment"] == branch_files
    assert hub.repos[REPO]["revisions"]["main"] == main_files  # untouched

    cache = tmp_path / "cache"
    got_main = snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=cache)
    got_branch = snapshot_download(REPO, revision="experiment", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    assert snapshot_bytes(got_main) == main_files
    assert snapshot_bytes(got_branch) == branch_files
    assert Path(got_main).name == hub.head(REPO, "main")
    assert Path(got_branch).name == hub.head(REPO, "experiment")

    # the small text file and the 2 MB binary both went base64-inside-the-commit ("regular"):
    # no LFS batch, no upload URL, no Xet token route was ever called
    paths = [path for _, path in hub.requests]
    assert ("POST", f"/api/models/{REPO}/preupload/main") in hub.requests
    assert ("POST", f"/api/models/{REPO}/commit/main") in hub.requests
    assert ("POST", f"/api/models/{REPO}/branch/experiment") in hub.requests
    assert ("POST", f"/api/models/{REPO}/commit/experiment") in hub.requests
    assert not [p for p in paths if "lfs" in p or "xet" in p]


def test_model_info_list_files_and_hf_hub_download(hub, tmp_path):
    import huggingface_hub
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()  # endpoint and token from the patched constants and HF_TOKEN, like peftlab's
    api.create_repo(REPO, exist_ok=True)
    files = make_folder(tmp_path / "model", "card\n", weights(2))
    commit = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "model", commit_message="upload")

    info = api.model_info(REPO)
    assert info.id == REPO and info.sha == commit.oid and info.private is False
    assert sorted(s.rfilename for s in info.siblings) == sorted(files)
    sizes = {s.rfilename: s.size for s in api.model_info(REPO, files_metadata=True).siblings}
    assert sizes == {name: len(data) for name, data in files.items()}
    assert sorted(api.list_repo_files(REPO)) == sorted(files)
    assert huggingface_hub.model_info(REPO).sha == commit.oid  # module-level function

    # no endpoint= here: the patched URL template routes it to the stand-in
    path = hf_hub_download(REPO, "adapter_model.safetensors", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == files["adapter_model.safetensors"]
    assert ("HEAD", f"/{REPO}/resolve/main/adapter_model.safetensors") in hub.requests
    assert api.whoami()["name"] == "tester"


def test_bad_token_is_a_401_on_create_repo_upload_and_whoami(hub, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    HfApi(token=TOKEN).create_repo(REPO)
    make_folder(tmp_path / "model", "x\n", b"\0\1\2")
    bad = HfApi(token="hf_not_a_valid_token")

    with pytest.raises(HfHubHTTPError) as err:
        bad.create_repo("tester/other", exist_ok=True)
    assert err.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(err.value)
    assert not isinstance(err.value, RepositoryNotFoundError)

    with pytest.raises(HfHubHTTPError) as err:
        bad.upload_folder(repo_id=REPO, folder_path=tmp_path / "model", commit_message="nope")
    assert err.value.response.status_code == 401

    with pytest.raises(HfHubHTTPError) as err:
        bad.whoami()
    assert err.value.response.status_code == 401

    assert set(hub.repos) == {REPO} and hub.repos[REPO]["revisions"]["main"] == {}
    assert "hf_not_a_valid_token" not in repr(vars(hub)) and TOKEN not in repr(vars(hub))


def test_without_a_token_private_repos_are_hidden_and_writes_refused(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    owner = HfApi(token=TOKEN)
    owner.create_repo("tester/secret", private=True)
    owner.create_repo("tester/open", private=False)
    make_folder(tmp_path / "model", "public\n", b"weights")
    owner.upload_folder(repo_id="tester/open", folder_path=tmp_path / "model")

    monkeypatch.delenv("HF_TOKEN")
    anonymous = HfApi()
    with pytest.raises(RepositoryNotFoundError) as err:  # like the Hub: 401, not 404
        anonymous.model_info("tester/secret")
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/secret", "README.txt", cache_dir=tmp_path / "cache")
    assert anonymous.model_info("tester/open").siblings
    assert Path(hf_hub_download("tester/open", "README.txt", cache_dir=tmp_path / "cache")).read_bytes() == b"public\n"
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo("tester/new")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.upload_folder(repo_id="tester/open", folder_path=tmp_path / "model")
    assert err.value.response.status_code == 401
    assert "tester/new" not in hub.repos


# the client itself PUTs the LFS object with httpx2 `data=<file>`, which httpx2 deprecates
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_lfs_mode_uses_the_lfs_batch_api_and_round_trips(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    with StandInHub(tokens={TOKEN}, lfs_threshold=1024 * 1024) as server:
        point_huggingface_hub_at(monkeypatch, server.url, token=TOKEN)
        api = HfApi()
        api.create_repo(REPO)
        files = make_folder(tmp_path / "model", "small\n", weights(3))
        api.upload_folder(repo_id=REPO, folder_path=tmp_path / "model")
        got = snapshot_download(REPO, cache_dir=tmp_path / "cache")
        assert snapshot_bytes(got) == files
        lfs = [s for s in api.model_info(REPO, files_metadata=True).siblings if s.lfs]
        assert [s.rfilename for s in lfs] == ["adapter_model.safetensors"]
        methods = [m for m, p in server.requests if "lfs" in p]
        assert methods == ["POST", "PUT", "POST"]  # batch, upload, verify
        assert server.errors == []
