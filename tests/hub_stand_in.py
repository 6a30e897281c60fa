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
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import socketserver
import threading
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
NOT_AUTHENTICATED = "Invalid username or password."
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag / oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256_hex: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_hex}\nsize {size}\n".encode()


def _now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _is_true(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


class HubError(Exception):
    """Raised by route handlers; turned into an HTTP error response like the Hub's."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: StandInHub

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse-DNS lookup that can stall for
        # seconds on machines without DNS; the name is not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class StandInHub:
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
        self._token_digests = frozenset(hashlib.sha256(t.encode()).digest() for t in tokens)
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.url: str | None = None
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._lfs_tickets: dict[str, tuple[str, str, int]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StandInHub:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
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

    # ------------------------------------------------------------------ state (call with lock)

    def _is_valid_token(self, token: str) -> bool:
        return hashlib.sha256(token.encode()).digest() in self._token_digests

    def _repo(self, repo_id: str) -> dict[str, Any]:
        return self.repos[repo_id]

    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\n".join((*parts, str(self._counter))).encode()).hexdigest()

    def _commit_by_oid(self, repo: dict, oid: str) -> dict | None:
        matches = [c for c in repo["commits"] if c["oid"].startswith(oid.lower())]
        return matches[0] if len(matches) == 1 else None

    def _commit_for(self, repo: dict, revision: str) -> dict:
        if revision in repo["refs"]:
            return self._commit_by_oid(repo, repo["refs"][revision])
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in repo["refs"]:
            return self._commit_by_oid(repo, repo["refs"][revision[len("refs/heads/"):]])
        if 4 <= len(revision) <= 40 and all(ch in "0123456789abcdefABCDEF" for ch in revision):
            commit = self._commit_by_oid(repo, revision)
            if commit is not None:
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _add_commit(self, repo: dict, branch: str, parent: str | None, files: dict[str, bytes],
                    lfs_paths: Iterable[str], title: str, message: str = "") -> dict:
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        oid = self._new_oid(parent or "", title, message, digest.hexdigest())
        commit = {"oid": oid, "branch": branch, "parents": [parent] if parent else [],
                  "title": title, "message": message, "files": files,
                  "lfs_paths": frozenset(p for p in lfs_paths if p in files), "date": _now()}
        repo["commits"].append(commit)
        repo["refs"][branch] = oid
        repo["revisions"][branch] = files
        return commit

    # ------------------------------------------------------------------ JSON views

    def _file_entry(self, commit: dict, path: str, expand: bool = False) -> dict:
        data = commit["files"][path]
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
        if path in commit["lfs_paths"]:
            sha = hashlib.sha256(data).hexdigest()
            pointer = lfs_pointer(sha, len(data))
            entry["oid"] = git_blob_sha1(pointer)
            entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
        else:
            entry["oid"] = git_blob_sha1(data)
        if expand:
            entry["lastCommit"] = {"id": commit["oid"], "title": commit["title"], "date": commit["date"]}
        return entry

    def _folder_entry(self, commit: dict, path: str, expand: bool = False) -> dict:
        children = sorted(p for p in commit["files"] if p.startswith(path + "/"))
        oid = hashlib.sha1("\n".join(children).encode()).hexdigest()
        entry: dict[str, Any] = {"type": "directory", "path": path, "oid": oid, "size": 0}
        if expand:
            entry["lastCommit"] = {"id": commit["oid"], "title": commit["title"], "date": commit["date"]}
        return entry

    def _etag_of(self, commit: dict, path: str) -> str:
        data = commit["files"][path]
        if path in commit["lfs_paths"]:
            return hashlib.sha256(data).hexdigest()
        return git_blob_sha1(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a length
    server_version = "hub-stand-in/1.0"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    server: _Server

    # http.server logs every request line to stderr; keep test output clean (and token-free).
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.hub._lock:
                self.server.hub._connections.discard(self.connection)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> StandInHub:
        return self.server.hub

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes = b"", *, content_type: str = "application/json",
              headers: dict[str, str] | None = None, content_length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.send_header("X-Request-Id", self._request_id)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), content_type=content_type, headers=headers)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.body or {"error": err.message}, err.status, headers=headers)

    def _dispatch(self) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        raw_path = split.path
        with hub._lock:
            hub.requests.append((self.command, raw_path))
            self._request_id = f"stand-in-{len(hub.requests)}"
        body = self._read_body()
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.body = body
        try:
            self.user = self._authenticate()
            self._route(raw_path)
        except HubError as err:
            self._error(err)
        except Exception:  # noqa: BLE001 -- a stand-in bug: answer 500, keep the connection
            hub.errors.append(traceback.format_exc())
            self._error(HubError(500, "stand-in hub internal error"))

    def _authenticate(self) -> str | None:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip() and self.hub._is_valid_token(token.strip()):
            return self.hub.user
        raise HubError(401, INVALID_CREDENTIALS)

    def _require_user(self) -> str:
        if self.user is None:
            raise HubError(401, NOT_AUTHENTICATED)
        return self.user

    def _readable_repo(self, repo_id: str) -> dict:
        """The repo, or the error the Hub gives: 401 if unauthenticated (missing or private)."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo["private"] and self.user is None):
            status = 401 if self.user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str) -> dict:
        self._require_user()
        return self._readable_repo(repo_id)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None

    # ------------------------------------------------------------------ routing

    def _route(self, raw_path: str) -> None:
        parts = raw_path.strip("/").split("/") if raw_path.strip("/") else []
        method = self.command
        with self.hub._lock:
            if parts[:2] == ["api", "whoami-v2"] and method == "GET":
                return self._whoami()
            if parts[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo()
            if parts[:3] == ["api", "repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if parts[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._json({"errors": [], "warnings": []})
            if len(parts) >= 2 and parts[:2] == ["__stand_in__", "lfs-upload"] and method == "PUT":
                return self._lfs_put(parts[2] if len(parts) > 2 else "")
            if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("datasets", "spaces", "kernels"):
                raise HubError(404, f"stand-in hub serves model repos only, not {parts[1]}", "RepoNotFound")
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
                return self._model_api(repo_id, parts[4:])
            if len(parts) >= 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
                repo_id = f"{unquote(parts[0])}/{unquote(parts[1][: -len('.git')])}"
                return self._lfs_api(repo_id, parts[5])
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
                return self._resolve(repo_id, unquote(parts[3]), "/".join(unquote(p) for p in parts[4:]))
        raise HubError(404, f"Sorry, we can't find the page you are looking for: {method} {raw_path}")

    def _model_api(self, repo_id: str, rest: list[str]) -> None:
        method, hub = self.command, self.hub
        action = rest[0] if rest else None
        arg = unquote(rest[1]) if len(rest) > 1 else None
        if action is None and method == "GET":
            repo = self._readable_repo(repo_id)
            return self._model_info(repo_id, repo, hub._commit_for(repo, "main"))
        if action == "revision" and arg is not None and method == "GET":
            repo = self._readable_repo(repo_id)
            return self._model_info(repo_id, repo, hub._commit_for(repo, arg))
        if action == "tree" and arg is not None and method == "GET":
            repo = self._readable_repo(repo_id)
            path = "/".join(unquote(p) for p in rest[2:]).strip("/")
            return self._tree(hub._commit_for(repo, arg), path)
        if action == "paths-info" and arg is not None and method == "POST":
            return self._paths_info(hub._commit_for(self._readable_repo(repo_id), arg))
        if action == "refs" and method == "GET":
            return self._refs(self._readable_repo(repo_id))
        if action == "commits" and arg is not None and method == "GET":
            repo = self._readable_repo(repo_id)
            return self._commits(repo, hub._commit_for(repo, arg))
        if action == "preupload" and arg is not None and method == "POST":
            return self._preupload(self._writable_repo(repo_id), arg)
        if action == "commit" and arg is not None and method == "POST":
            return self._commit(repo_id, self._writable_repo(repo_id), arg)
        if action == "branch" and arg is not None and method == "POST":
            return self._create_branch(self._writable_repo(repo_id), arg)
        if action == "branch" and arg is not None and method == "DELETE":
            return self._delete_branch(self._writable_repo(repo_id), arg)
        raise HubError(404, f"Sorry, we can't find the page you are looking for: {method} {self.path}")

    # ------------------------------------------------------------------ account / repos

    def _whoami(self) -> None:
        user = self._require_user()
        self._json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
            "fullname": user, "email": None, "emailVerified": False, "canPay": False, "isPro": False,
            "periodEnd": None, "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "stand-in token", "role": "write", "createdAt": _now()}},
        })

    def _create_repo(self) -> None:
        user = self._require_user()
        payload = self._json_body()
        if payload.get("type") not in (None, "model"):
            raise HubError(400, f"stand-in hub serves model repos only, not {payload.get('type')}")
        name = payload.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise HubError(400, "Invalid repo name")
        repo_id = f"{payload.get('organization') or user}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            raise HubError(409, "You already created this model repo", body={
                "error": "You already created this model repo", "url": url})
        repo = {"private": payload.get("visibility") == "private", "revisions": {}, "commits": [],
                "refs": {}, "lfs_objects": {}, "created_at": _now()}
        self.hub.repos[repo_id] = repo
        self.hub._add_commit(repo, "main", None, {}, (), "initial commit")
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        user = self._require_user()
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        if self.hub.repos.pop(repo_id, None) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        self._json({})

    def _create_branch(self, repo: dict, branch: str) -> None:
        if branch in repo["refs"]:
            raise HubError(409, "Reference already exists")
        start = self._json_body().get("startingPoint") or "main"
        base = self.hub._commit_for(repo, start)
        repo["refs"][branch] = base["oid"]
        repo["revisions"][branch] = base["files"]
        self._json({})

    def _delete_branch(self, repo: dict, branch: str) -> None:
        if branch not in repo["refs"]:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo["refs"][branch]
        repo["revisions"].pop(branch, None)
        self._json({})

    def _refs(self, repo: dict) -> None:
        def ref(name: str) -> dict:
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}",
                    "targetCommit": repo["refs"][name]}
        branches = [ref(n) for n in repo["refs"] if not n.startswith("refs/pr/")]
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _is_true(self.query.get("include_prs")):
            payload["pullRequests"] = [ref(n) for n in repo["refs"] if n.startswith("refs/pr/")]
        self._json(payload)

    def _commits(self, repo: dict, head: dict) -> None:
        items, commit = [], head
        while commit is not None:
            items.append({"id": commit["oid"], "title": commit["title"], "message": commit["message"],
                          "authors": [{"user": self.hub.user}], "date": commit["date"]})
            commit = self.hub._commit_by_oid(repo, commit["parents"][0]) if commit["parents"] else None
        self._json(items)

    # ------------------------------------------------------------------ read API

    def _model_info(self, repo_id: str, repo: dict, commit: dict) -> None:
        blobs = _is_true(self.query.get("blobs"))
        siblings = []
        for path in sorted(commit["files"]):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = self.hub._file_entry(commit, path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"size": entry["lfs"]["size"], "sha256": entry["lfs"]["oid"],
                                      "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(sibling)
        self._json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": commit["oid"], "lastModified": commit["date"],
            "createdAt": repo["created_at"], "private": repo["private"], "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "spaces": [], "usedStorage": sum(len(d) for d in commit["files"].values()),
        })

    def _tree(self, commit: dict, path: str) -> None:
        recursive = _is_true(self.query.get("recursive"))
        expand = _is_true(self.query.get("expand"))
        files = commit["files"]
        prefix = f"{path}/" if path else ""
        if path and path in files:
            raise HubError(400, f"{path} is a file, not a directory")
        below = sorted(p for p in files if p.startswith(prefix))
        if path and not below:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit["oid"]})
        folders: set[str] = set()
        entries = []
        for p in below:
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                if depth == 1 or recursive:
                    folders.add(prefix + "/".join(rel[:depth]))
            if recursive or len(rel) == 1:
                entries.append(self.hub._file_entry(commit, p, expand))
        folder_entries = [self.hub._folder_entry(commit, f, expand) for f in sorted(folders)]
        self._json(folder_entries + entries)

    def _paths_info(self, commit: dict) -> None:
        form = parse_qs(self.body.decode(), keep_blank_values=True)
        expand = _is_true(form.get("expand"))
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit["files"]:
                out.append(self.hub._file_entry(commit, path, expand))
            elif any(p.startswith(path + "/") for p in commit["files"]):
                out.append(self.hub._folder_entry(commit, path, expand))
        self._json(out)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._readable_repo(repo_id)
        commit = self.hub._commit_for(repo, revision)
        if path not in commit["files"]:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit["oid"]})
        data = commit["files"][path]
        etag = self.hub._etag_of(commit, path)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit["oid"], "Accept-Ranges": "bytes",
                   "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'}
        if path in commit["lfs_paths"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        status, body = 200, data
        requested = self.headers.get("Range")
        if requested and self.command == "GET":
            start, end = self._parse_range(requested, len(data))
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, content_type="application/octet-stream", headers=headers,
                   content_length=len(body))

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int, int]:
        unit, _, spec = header.partition("=")
        first, _, last = spec.strip().partition("-")
        if unit.strip().lower() != "bytes" or "," in spec:
            raise HubError(416, "Unsupported range", headers={"Content-Range": f"bytes */{size}"})
        if first == "":
            start, end = max(size - int(last or 0), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        return start, end

    # ------------------------------------------------------------------ write API

    def _preupload(self, repo: dict, revision: str) -> None:
        commit = self.hub._commit_for(repo, revision)
        payload = self._json_body()
        threshold = self.hub.lfs_threshold
        answers = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            mode = "lfs" if threshold is not None and size > 0 and size >= threshold else "regular"
            oid = self.hub._etag_of(commit, path) if path in commit["files"] else None
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": answers, "commitOid": commit["oid"]})

    def _commit(self, repo_id: str, repo: dict, revision: str) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be the header")
        header = lines[0]["value"]
        pr_url = None
        if _is_true(self.query.get("create_pr")):
            base = hub._commit_for(repo, revision)
            number = 1 + sum(1 for name in repo["refs"] if name.startswith("refs/pr/"))
            branch = f"refs/pr/{number}"
            repo["refs"][branch] = base["oid"]
            repo["revisions"][branch] = base["files"]
            pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
        elif revision in repo["refs"]:
            branch = revision
        elif revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in repo["refs"]:
            branch = revision[len("refs/heads/"):]
        else:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = hub._commit_by_oid(repo, repo["refs"][branch])
        parent_commit = header.get("parentCommit")
        if parent_commit and not head["oid"].startswith(parent_commit.lower()):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, lfs_paths = dict(head["files"]), set(head["lfs_paths"])
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                content = value.get("content", "")
                files[path] = (base64.b64decode(content) if value.get("encoding") == "base64"
                               else content.encode())
                lfs_paths.discard(path)
            elif key == "lfsFile":
                data = repo["lfs_objects"].get(value.get("oid"))
                if data is None:
                    raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a "
                                        f"file that does not exist ({path})")
                files[path] = data
                lfs_paths.add(path)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        commit = hub._add_commit(repo, branch, head["oid"], files, lfs_paths,
                                 header.get("summary", ""), header.get("description", ""))
        self._json({"success": True, "commitOid": commit["oid"],
                    "commitUrl": f"{hub.url}/{repo_id}/commit/{commit['oid']}",
                    "hookOutput": "", "pullRequestUrl": pr_url})

    # ------------------------------------------------------------------ git-LFS (basic transfer)

    def _lfs_api(self, repo_id: str, action: str) -> None:
        if self.command != "POST":
            raise HubError(405, "Method not allowed")
        repo = self._writable_repo(repo_id)
        payload = self._json_body()
        if action == "verify":
            if payload.get("oid") not in repo["lfs_objects"]:
                raise HubError(404, "Object not found")
            return self._json({}, content_type=LFS_CONTENT_TYPE)
        if action != "batch":
            raise HubError(404, f"Unknown LFS route {action}")
        if payload.get("operation") != "upload":
            raise HubError(400, "stand-in hub only implements LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo["lfs_objects"]:
                ticket = secrets.token_urlsafe(16)
                self.hub._lfs_tickets[ticket] = (repo_id, oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__stand_in__/lfs-upload/{ticket}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type=LFS_CONTENT_TYPE)

    def _lfs_put(self, ticket: str) -> None:
        # Stands for the pre-signed storage URL: the client sends no Authorization header here.
        target = self.hub._lfs_tickets.get(ticket)
        if target is None:
            raise HubError(403, "Invalid or expired upload URL")
        repo_id, oid, size = target
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match the announced oid/size")
        del self.hub._lfs_tickets[ticket]
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        repo["lfs_objects"][oid] = self.body
        self._send(200, b"", headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})


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
