"""The HTTP side of the Hub stand-in (``tests/hub_stand_in.py``): request handler and routes.

``StandInHandler`` reads each request (a ``Content-Length`` or chunked body), logs it as
``(method, path)`` in ``StandInHub.requests``, authenticates the bearer token, routes the path
to one of the routes below and answers; a ``HubError`` becomes the Hub's error response
(``X-Error-Code`` / ``X-Error-Message`` headers, JSON ``{"error": ...}`` body), any other
exception a 500 whose traceback goes to ``StandInHub.errors``. Routing and the routes run with
the hub's lock held; the repo state and the JSON bodies come from ``tests/hub_stand_in_store.py``.
The protocol and the auth rules are described in ``tests/hub_stand_in.py``.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from hub_stand_in_store import HubError, now_iso

if TYPE_CHECKING:
    from hub_stand_in import StandInHub, StandInServer

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
NOT_AUTHENTICATED = "Invalid username or password."
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"


def _is_true(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


class StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a length
    server_version = "hub-stand-in/1.0"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    server: StandInServer

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
            return self._json(hub._refs(self._readable_repo(repo_id), _is_true(self.query.get("include_prs"))))
        if action == "commits" and arg is not None and method == "GET":
            repo = self._readable_repo(repo_id)
            return self._json(hub._commits(repo, hub._commit_for(repo, arg)))
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
                     "accessToken": {"displayName": "stand-in token", "role": "write", "createdAt": now_iso()}},
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
        self.hub._create_repo(repo_id, private=payload.get("visibility") == "private")
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
        self.hub._set_ref(repo, branch, self.hub._commit_for(repo, start))
        self._json({})

    def _delete_branch(self, repo: dict, branch: str) -> None:
        self.hub._delete_branch(repo, branch)
        self._json({})

    # ------------------------------------------------------------------ read API

    def _model_info(self, repo_id: str, repo: dict, commit: dict) -> None:
        self._json(self.hub._model_info(repo_id, repo, commit, _is_true(self.query.get("blobs"))))

    def _tree(self, commit: dict, path: str) -> None:
        recursive = _is_true(self.query.get("recursive"))
        expand = _is_true(self.query.get("expand"))
        self._json(self.hub._tree(commit, path, recursive, expand))

    def _paths_info(self, commit: dict) -> None:
        form = parse_qs(self.body.decode(), keep_blank_values=True)
        self._json(self.hub._paths_info(commit, form.get("paths", []), _is_true(form.get("expand"))))

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
            number = hub._open_pr(repo, revision)
            branch = f"refs/pr/{number}"
            pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
        else:
            branch = hub._branch_of(repo, revision)
        commit = hub._commit_operations(repo, branch, header.get("parentCommit"), lines[1:],
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
                ticket = self.hub._lfs_ticket(repo_id, oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__stand_in__/lfs-upload/{ticket}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type=LFS_CONTENT_TYPE)

    def _lfs_put(self, ticket: str) -> None:
        # Stands for the pre-signed storage URL: the client sends no Authorization header here.
        self.hub._lfs_upload(ticket, self.body)
        self._send(200, b"", headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})
