"""Repo and commit state of the Hub stand-in (``tests/hub_stand_in.py``), and its JSON views.

No HTTP here: ``RepoStore`` (the base class of ``StandInHub``) holds the repos, makes commits,
branches and pull-request refs, and builds the JSON bodies that the request handler in
``tests/hub_stand_in_routes.py`` sends. Failures are raised as ``HubError``, which the handler
turns into the Hub's error response. Every ``_`` method is called with ``_lock`` held.

A repo is ``{"private": bool, "revisions": {branch: {path: bytes}}, "commits": [commit, ...],
"refs": {branch: commit oid}, "lfs_objects": {sha256: bytes}, "created_at": str}``; a commit is
``{"oid", "branch", "parents", "title", "message", "files": {path: bytes}, "lfs_paths": frozenset,
"date"}``. Oids are sha1 hex digests; a revision is a branch, ``refs/heads/<branch>``,
``refs/pr/<n>`` or a (prefix of a) commit oid.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag / oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256_hex: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_hex}\nsize {size}\n".encode()


def now_iso() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class HubError(Exception):
    """Raised by route handlers; turned into an HTTP error response like the Hub's."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


class RepoStore:
    """The repos of one stand-in hub; `user` is the single user (the author of every commit)."""

    def __init__(self, user: str):
        self.user = user
        self.repos: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._lfs_tickets: dict[str, tuple[str, str, int]] = {}

    # ------------------------------------------------------------------ state

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
                  "lfs_paths": frozenset(p for p in lfs_paths if p in files), "date": now_iso()}
        repo["commits"].append(commit)
        repo["refs"][branch] = oid
        repo["revisions"][branch] = files
        return commit

    def _create_repo(self, repo_id: str, private: bool) -> dict:
        """A new repo with one empty "initial commit" on ``main``."""
        repo = {"private": private, "revisions": {}, "commits": [], "refs": {}, "lfs_objects": {},
                "created_at": now_iso()}
        self.repos[repo_id] = repo
        self._add_commit(repo, "main", None, {}, (), "initial commit")
        return repo

    def _set_ref(self, repo: dict, branch: str, commit: dict) -> None:
        repo["refs"][branch] = commit["oid"]
        repo["revisions"][branch] = commit["files"]

    def _delete_branch(self, repo: dict, branch: str) -> None:
        if branch not in repo["refs"]:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo["refs"][branch]
        repo["revisions"].pop(branch, None)

    def _open_pr(self, repo: dict, revision: str) -> int:
        """Create the next ``refs/pr/N`` at `revision`; returns N."""
        base = self._commit_for(repo, revision)
        number = 1 + sum(1 for name in repo["refs"] if name.startswith("refs/pr/"))
        self._set_ref(repo, f"refs/pr/{number}", base)
        return number

    def _branch_of(self, repo: dict, revision: str) -> str:
        """The branch a commit to `revision` goes to (a branch name or ``refs/heads/<name>``)."""
        if revision in repo["refs"]:
            return revision
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in repo["refs"]:
            return revision[len("refs/heads/"):]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit_operations(self, repo: dict, branch: str, parent_commit: str | None,
                           operations: list[dict], title: str, message: str) -> dict:
        """Apply the commit payload's operation lines to the head of `branch` and commit."""
        head = self._commit_by_oid(repo, repo["refs"][branch])
        if parent_commit and not head["oid"].startswith(parent_commit.lower()):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, lfs_paths = dict(head["files"]), set(head["lfs_paths"])
        for line in operations:
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
        return self._add_commit(repo, branch, head["oid"], files, lfs_paths, title, message)

    def _lfs_ticket(self, repo_id: str, oid: str, size: int) -> str:
        """A one-time ticket (the last part of the upload URL) for the LFS object `oid`."""
        ticket = secrets.token_urlsafe(16)
        self._lfs_tickets[ticket] = (repo_id, oid, size)
        return ticket

    def _lfs_upload(self, ticket: str, data: bytes) -> None:
        """Keep `data` as the LFS object that `ticket` was made for; the ticket is used up."""
        target = self._lfs_tickets.get(ticket)
        if target is None:
            raise HubError(403, "Invalid or expired upload URL")
        repo_id, oid, size = target
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match the announced oid/size")
        del self._lfs_tickets[ticket]
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        repo["lfs_objects"][oid] = data

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

    def _model_info(self, repo_id: str, repo: dict, commit: dict, blobs: bool) -> dict:
        siblings = []
        for path in sorted(commit["files"]):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = self._file_entry(commit, path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"size": entry["lfs"]["size"], "sha256": entry["lfs"]["oid"],
                                      "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": commit["oid"], "lastModified": commit["date"],
            "createdAt": repo["created_at"], "private": repo["private"], "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "spaces": [], "usedStorage": sum(len(d) for d in commit["files"].values()),
        }

    def _tree(self, commit: dict, path: str, recursive: bool, expand: bool) -> list[dict]:
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
                entries.append(self._file_entry(commit, p, expand))
        return [self._folder_entry(commit, f, expand) for f in sorted(folders)] + entries

    def _paths_info(self, commit: dict, paths: list[str], expand: bool) -> list[dict]:
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit["files"]:
                out.append(self._file_entry(commit, path, expand))
            elif any(p.startswith(path + "/") for p in commit["files"]):
                out.append(self._folder_entry(commit, path, expand))
        return out

    def _refs(self, repo: dict, include_prs: bool) -> dict:
        def ref(name: str) -> dict:
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}",
                    "targetCommit": repo["refs"][name]}
        branches = [ref(n) for n in repo["refs"] if not n.startswith("refs/pr/")]
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if include_prs:
            payload["pullRequests"] = [ref(n) for n in repo["refs"] if n.startswith("refs/pr/")]
        return payload

    def _commits(self, repo: dict, head: dict) -> list[dict]:
        items, commit = [], head
        while commit is not None:
            items.append({"id": commit["oid"], "title": commit["title"], "message": commit["message"],
                          "authors": [{"user": self.user}], "date": commit["date"]})
            commit = self._commit_by_oid(repo, commit["parents"][0]) if commit["parents"] else None
        return items
