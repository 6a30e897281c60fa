"""A local stand-in for the Hugging Face Hub HTTP API, for tests.

It speaks the wire protocol that the *unmodified* ``huggingface_hub`` client (2.4.x) uses, so
``HfApi.create_repo``, ``create_branch``, ``upload_folder`` / ``create_commit``, ``model_info``,
``list_repo_files`` / ``list_repo_tree``, ``list_repo_refs``, ``list_repo_commits``, ``whoami``,
``hf_hub_download`` and ``snapshot_download`` all work against ``http://127.0.0.1:<port>``.
Stdlib only: a ``ThreadingHTTPServer`` in a background thread, bound to a free port.

Protocol notes (taken from the installed huggingface_hub source, not from memory):

* uploads: ``POST /api/models/{repo}/preupload/{rev}`` answers ``uploadMode: "regular"`` for every
  file (unless ``lfs_threshold`` is set), so file contents travel base64-encoded inside the NDJSON
  body of ``POST /api/models/{repo}/commit/{rev}``. The client only ever uses Xet/LFS for files the
  server marks ``"lfs"``; Xet is never advertised (no ``X-Xet-*`` headers, no ``xetHash``, no xet
  token routes, the LFS batch answer says ``"transfer": "basic"``).
* with ``lfs_threshold=N``, files of N bytes or more are marked ``"lfs"``; the client then uses the
  git-LFS batch API (``POST /{repo}.git/info/lfs/objects/batch``), a credential-free ``PUT`` to a
  one-time upload URL, and ``POST /{repo}.git/info/lfs/objects/verify``. That path needs
  ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` on the client, otherwise the client
  would upload "lfs" files through hf_xet, which this server does not implement.
* downloads: ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``ETag`` (git blob sha1, or the
  sha256 for LFS files, which also get ``X-Linked-Etag``/``X-Linked-Size``), ``X-Repo-Commit``,
  ``Content-Length`` and ``Accept-Ranges``; ``Range: bytes=a-b`` is honoured (206).
* errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
  ``X-Error-Message`` headers plus a JSON ``{"error": ...}`` body, which is what
  ``huggingface_hub.utils.hf_raise_for_status`` maps onto its error classes.

Auth, like the real Hub:

* an ``Authorization: Bearer <token>`` header whose token is not valid -> 401 on *every* route,
  body ``{"error": "Invalid credentials in Authorization header"}`` (plain ``HfHubHTTPError``);
* no token: public repos are readable; a private *or missing* repo -> 401 with
  ``X-Error-Code: RepoNotFound`` (the client raises ``RepositoryNotFoundError``, status 401); the
  Hub answers 401 rather than 404 so as not to reveal that a private repo exists;
* a valid token, missing repo -> 404 ``RepoNotFound``;
* every write (create/delete repo, branch, preupload, commit, LFS batch/verify) without a valid
  token -> 401 ``{"error": "Invalid username or password."}``;
* any valid token may read and write every repo (there is a single user, ``user``).

Tokens are hashed (sha256) on construction and only digests are kept and compared; tokens are
never logged (the request log holds only ``(method, path)``, and the default access log of
``http.server`` is silenced).

Scope: model repos only (``repo_type=None``/``"model"``); no .gitattributes or initial files are
created (a new repo has one empty "initial commit" on ``main``); no gating, tags or discussions
(``create_pr=1`` on commit is supported: it creates ``refs/pr/N``).

Layout: this module holds the public API (``StandInHub``, its server, and
``point_huggingface_hub_at``); ``tests/hub_stand_in_routes.py`` the request handler (body
reading, auth, routing, one method per route) and ``tests/hub_stand_in_store.py`` the repo and
commit state (``RepoStore``, which ``StandInHub`` extends) and the JSON bodies of the read routes.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import socketserver
import threading
from collections.abc import Iterable
from http.server import ThreadingHTTPServer
from typing import Any, Self

from hub_stand_in_routes import StandInHandler
from hub_stand_in_store import RepoStore


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: StandInHub

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse-DNS lookup that can stall for
        # seconds on machines without DNS; the name is not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class StandInHub(RepoStore):
    """A Hugging Face Hub stand-in on ``http://127.0.0.1:<free port>``; use as a context manager.

    Args:
        tokens: the valid tokens (only their sha256 digests are kept).
        user: the user every valid token belongs to (``whoami`` name, default namespace).
        lfs_threshold: if set, files of at least this many bytes are answered ``"lfs"`` by the
            preupload route (git-LFS batch + PUT); by default every file is ``"regular"``.

    Attributes:
        url: ``"http://127.0.0.1:<port>"`` once started (``None`` before).
        repos: ``repo_id -> {"private": bool, "revisions": {branch: {path: bytes}},
            "commits": [commit, ...], "refs": {branch: commit oid}, "lfs_objects": {sha256: bytes},
            "created_at": str}``; each commit is ``{"oid", "branch", "parents", "title",
            "message", "files": {path: bytes}, "lfs_paths": frozenset, "date"}``.
        requests: every request as ``(method, path)``, path raw (still percent-encoded), without
            the query string, e.g. ``("POST", "/api/models/tester/demo/commit/main")``.
        errors: tracebacks of unexpected server-side exceptions (answered with HTTP 500).
    """

    def __init__(self, tokens: Iterable[str] = frozenset({"hf_test_token"}), user: str = "tester",
                 *, lfs_threshold: int | None = None):
        if isinstance(tokens, str):
            tokens = {tokens}
        super().__init__(user)
        self._token_digests = frozenset(hashlib.sha256(t.encode()).digest() for t in tokens)
        self.lfs_threshold = lfs_threshold
        self.url: str | None = None
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._server: StandInServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StandInHub:
        if self._server is not None:
            return self
        server = StandInServer(("127.0.0.1", 0), StandInHandler)
        server.hub = self
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake handler threads idling on keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at a branch or commit oid (a copy)."""
        with self._lock:
            return dict(self._commit_for(self._repo(repo_id), revision)["files"])

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._repo(repo_id)["refs"][branch]

    # ------------------------------------------------------------------ auth (for the handler)

    def _is_valid_token(self, token: str) -> bool:
        return hashlib.sha256(token.encode()).digest() in self._token_digests


def point_huggingface_hub_at(monkeypatch: Any, url: str, token: str | None = None,
                             token_path: str | None = None) -> None:
    """Point the installed huggingface_hub at `url` for one test; `monkeypatch` undoes it all.

    huggingface_hub reads its environment once, at import time, into `huggingface_hub.constants`
    (and the tests' conftest imports it with HF_HUB_OFFLINE=1 already set), so setting env vars
    inside a test changes nothing by itself. The module attributes are patched too:

    * `constants.HF_HUB_OFFLINE = False`: `constants.is_offline_mode()` (checked by the request hook
      of every HTTP call) returns this module global;
    * `constants.ENDPOINT`: the default of `HfApi(endpoint=None)`, read when the HfApi is built;
    * `constants.HUGGINGFACE_CO_URL_TEMPLATE`: `hf_hub_url` formats the /resolve URL with it (it
      was built from ENDPOINT at import), so without it `hf_hub_download(...)` without
      `endpoint=` would still go to huggingface.co;
    * `huggingface_hub.hf_api.api.endpoint`: the module-level functions (`huggingface_hub.create_repo`,
      `upload_folder`, `model_info`, ...) are bound methods of an HfApi built at import;
    * `constants.HF_HUB_DISABLE_XET = True`: with hf_xet installed, `upload_folder` otherwise takes
      the hf_xet "pipelined" path (it still works with this server, which marks every file
      "regular", but it starts an hf_xet session, which creates `$HF_HOME/xet`), and files in
      "lfs" mode (`lfs_threshold`) would be sent through Xet, which this server does not speak;
    * `constants.HF_HUB_DISABLE_TELEMETRY = True`: otherwise building the user-agent calls
      `detect_agent()`, which fetches `{ENDPOINT}/api/agent-harnesses` once per process and caches
      it under HF_HOME.

    The token: `token` goes to HF_TOKEN (what `get_token()` reads first, at call time; None
    removes it), and `constants.HF_TOKEN_PATH` is pointed at `token_path` (default: a path that
    does not exist) so that a developer's own `hf auth login` token is never picked up or sent.
    """
    from huggingface_hub import constants, hf_api

    url = url.rstrip("/")
    for name, value in (("HF_ENDPOINT", url), ("HF_HUB_OFFLINE", "0"), ("HF_HUB_DISABLE_XET", "1"),
                        ("HF_HUB_DISABLE_TELEMETRY", "1")):
        monkeypatch.setenv(name, value)  # for subprocesses, and code that reads the env itself
    for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", token_path or f"/nonexistent-stand-in-{secrets.token_hex(4)}/token")
    monkeypatch.setattr(hf_api.api, "endpoint", url)
