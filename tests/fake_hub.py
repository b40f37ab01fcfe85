"""A loopback stand-in for the Hugging Face Hub's write and read API, for publish tests with the real client.

It speaks just enough of the Hub's HTTP API for the unmodified ``huggingface_hub`` client to run ``create_repo``,
``create_branch``, ``upload_folder`` (``preupload`` answered with upload mode ``regular``, so file contents travel
base64-encoded in the NDJSON ``commit`` body; no LFS/Xet), ``model_info`` / ``repo_info``, ``list_repo_tree`` /
``list_repo_files`` and ``HEAD``/``GET .../resolve/...``, so that ``snapshot_download`` re-downloads what was
uploaded. Repos live in memory with a real commit history (each commit a sha over its parent, message and files).

Every request must carry ``Authorization: Bearer <token>``; a missing or wrong token gets a 401 like the Hub's, so a
test that succeeds proves the client sent the token. The server never echoes the token back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` / ``ETag`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha

    def resolve(self, rev: str) -> Commit | None:
        sha = self.refs.get(rev, rev)
        return self.commits.get(sha)


class FakeHub:
    """Start with ``FakeHub(token="hf_...")``; ``url`` is the endpoint, ``close()`` stops it. ``requests`` records
    ``(method, path, authorized)`` for every request."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeHub":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- repo operations (also usable from tests) -------------------------------------------------------------------
    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, repo_type, private)
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"
        self.commit(repo, "main", "initial commit", {".gitattributes": gitattributes}, [])
        self.repos[(repo_type, repo_id)] = repo
        return repo

    @staticmethod
    def commit(repo: Repo, branch: str, message: str, add: dict[str, bytes], delete: list[str]) -> Commit:
        parent = repo.refs.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for p in delete:
            for k in [k for k in files if k == p or k.startswith(p.rstrip("/") + "/")]:
                del files[k]
        files.update(add)
        h = hashlib.sha1()
        h.update(f"{parent}\0{message}\0".encode())
        for p in sorted(files):
            h.update(f"{p}\0{git_blob_sha1(files[p])}\n".encode())
        c = Commit(h.hexdigest(), parent, message, files)
        repo.commits[c.sha] = c
        repo.refs[branch] = c.sha
        return c

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        c = repo.resolve(revision)
        assert c is not None, revision
        return dict(c.files)


_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit|branch)"
                       r"(?:/([^/]+))?(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        # -- plumbing --------------------------------------------------------------------------------------------
        def _send(self, code: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None) -> None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, code: int, message: str, error_code: str | None = None) -> None:
            self._send(code, {"error": message}, {"X-Error-Code": error_code} if error_code else None)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _authorized(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {hub.token}"

        def _repo(self, kind: str, repo_id: str) -> Repo | None:
            repo = hub.repos.get((kind, repo_id))
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
            return repo

        def _commit(self, repo: Repo, rev: str) -> Commit | None:
            c = repo.resolve(rev)
            if c is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return c

        def _info(self, repo: Repo, c: Commit) -> dict[str, Any]:
            card: dict[str, Any] = {}
            readme = c.files.get("README.md", b"").decode(errors="replace")
            m = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
            if m:
                card = yaml.safe_load(m.group(1)) or {}
            return {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                    "modelId": repo.repo_id, "sha": c.sha, "private": repo.private, "disabled": False,
                    "gated": False, "tags": list(card.get("tags") or []), "cardData": card,
                    "siblings": [{"rfilename": p} for p in sorted(c.files)]}

        # -- routing ---------------------------------------------------------------------------------------------
        def _route(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            ok = self._authorized()
            with hub.lock:
                hub.requests.append((self.command, path, ok))
            body = self._body() if self.command == "POST" else b""
            if not ok:
                return self._error(401, "Invalid credentials in Authorization header")
            with hub.lock:
                if path == "/api/repos/create" and self.command == "POST":
                    return self._create(json.loads(body or b"{}"))
                if path == "/api/validate-yaml" and self.command == "POST":
                    return self._validate(json.loads(body or b"{}"))
                m = _API_REPO.match(path)
                if m:
                    kind, repo_id, op, rev, rest = m.groups()
                    kind = kind[:-1]
                    rev = unquote(rev) if rev else None
                    repo = self._repo(kind, repo_id)
                    if repo is None:
                        return None
                    if op is None and self.command == "GET":
                        return self._send(200, self._info(repo, repo.resolve("main")))
                    if op == "revision" and self.command == "GET":
                        c = self._commit(repo, rev or "main")
                        return c and self._send(200, self._info(repo, c))
                    if op == "tree" and self.command == "GET":
                        c = self._commit(repo, rev or "main")
                        return c and self._tree(c, unquote(rest or ""), query.get("recursive", ["false"])[0])
                    if op == "preupload" and self.command == "POST":
                        c = self._commit(repo, rev or "main")
                        return c and self._preupload(c, json.loads(body))
                    if op == "commit" and self.command == "POST":
                        return self._commit_post(repo, rev or "main", body)
                    if op == "branch" and self.command == "POST":
                        return self._branch(repo, rev, json.loads(body or b"{}"))
                m = _RESOLVE.match(path)
                if m and self.command in ("GET", "HEAD"):
                    kind = (m.group(1) or "models")[:-1]
                    repo = self._repo(kind, m.group(2))
                    if repo is None:
                        return None
                    c = self._commit(repo, unquote(m.group(3)))
                    if c is None:
                        return None
                    fname = unquote(m.group(4))
                    if fname not in c.files:
                        return self._error(404, "Entry not found", "EntryNotFound")
                    data = c.files[fname]
                    return self._send(200, data, {"X-Repo-Commit": c.sha, "ETag": f'"{git_blob_sha1(data)}"',
                                                  "Content-Type": "application/octet-stream"})
            return self._error(404, f"no route for {self.command} {path}")

        do_GET = do_HEAD = do_POST = _route

        # -- endpoints -------------------------------------------------------------------------------------------
        def _create(self, payload: dict[str, Any]) -> None:
            kind = payload.get("type") or "model"
            name, org = payload.get("name"), payload.get("organization")
            repo_id = f"{org}/{name}" if org else f"user/{name}"
            prefix = "" if kind == "model" else f"{kind}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            if (kind, repo_id) in hub.repos:  # the Hub's 409 carries the url too (create_repo(exist_ok=True) reads it)
                return self._send(409, {"error": "You already created this model repo", "url": url})
            hub.create(kind, repo_id, payload.get("visibility") == "private")
            self._send(200, {"url": url, "name": repo_id, "id": repo_id})

        def _validate(self, payload: dict[str, Any]) -> None:
            text = payload.get("content", "")
            m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
            try:
                meta = yaml.safe_load(m.group(1)) if m else {}
            except yaml.YAMLError as e:
                return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            if not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
            self._send(200, {"errors": [], "warnings": []})

        def _tree(self, c: Commit, under: str, recursive: str) -> None:
            prefix = under.strip("/") + "/" if under.strip("/") else ""
            deep = recursive.lower() in ("1", "true")
            entries: dict[str, dict[str, Any]] = {}
            for p, data in sorted(c.files.items()):
                if not p.startswith(prefix):
                    continue
                rel = p[len(prefix):].split("/")
                for i in range(1, len(rel)):  # folders on the way
                    d = prefix + "/".join(rel[:i])
                    if deep or i == 1:
                        entries.setdefault(d, {"type": "directory", "path": d, "size": 0,
                                               "oid": hashlib.sha1(d.encode()).hexdigest()})
                if deep or len(rel) == 1:
                    entries[p] = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
            self._send(200, list(entries.values()))

        def _preupload(self, c: Commit, payload: dict[str, Any]) -> None:
            out = []
            for f in payload.get("files", []):
                old = c.files.get(f["path"])
                out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                            "oid": git_blob_sha1(old) if old is not None else None})
            self._send(200, {"files": out, "commitOid": c.sha})

        def _commit_post(self, repo: Repo, branch: str, body: bytes) -> None:
            if branch not in repo.refs:
                return self._error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            message, add, delete = "", {}, []
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent and parent != repo.refs[branch]:
                        return self._error(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, "only base64 file contents are supported")
                    add[value["path"]] = base64.b64decode(value["content"])
                elif key in ("deletedFile", "deletedFolder"):
                    delete.append(value["path"])
                else:  # lfsFile etc.: preupload never asks for LFS
                    return self._error(400, f"unsupported commit operation '{key}' (the fake Hub answers regular "
                                            f"upload mode only)")
            c = hub.commit(repo, branch, message, add, delete)
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            self._send(200, {"success": True, "commitOid": c.sha, "pullRequestUrl": None,
                             "commitUrl": f"{hub.url}/{prefix}{repo.repo_id}/commit/{c.sha}"})

        def _branch(self, repo: Repo, branch: str | None, payload: dict[str, Any]) -> None:
            if not branch:
                return self._error(400, "branch name missing")
            if branch in repo.refs:
                return self._error(409, "Reference already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            repo.refs[branch] = start.sha
            self._send(200, {})

    return Handler
