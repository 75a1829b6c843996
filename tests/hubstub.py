"""A local stand-in for the Hugging Face Hub: a real HTTP server on 127.0.0.1 for pull tests.

It serves, from in-memory repos, the endpoints huggingface_hub 2.x uses in `snapshot_download`:

    GET  /api/models/{repo}/revision/{rev}        repo info (sha = commit of the revision)
    GET  /api/models/{repo}/tree/{rev}[/{path}]   recursive file listing (size, oid, lfs)
    HEAD /{repo}/resolve/{rev}/{path}             file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}             the file, honouring Range (206)
    HEAD/GET /cdn/{sha256}                        LFS blobs; /resolve redirects *.safetensors here

with the Hub's error conventions (X-Error-Code: RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo; 401 for a private repo without a valid token). It logs every request so tests can
check what was fetched and which headers were sent, and can drop a connection mid-file once
(`drop_once`) or fail a file (`fail`) to exercise resumed downloads. huggingface_hub is pointed at it with HF_ENDPOINT.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth", ".onnx")


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a non-LFS file's oid/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StubRepo:
    """One repo: named revisions pointing at commits, each commit a {path: bytes} tree."""

    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    token: str | None = None  # when set, requests must carry "Authorization: Bearer <token>"
    gated: bool = False  # with a token: a missing/wrong token gets 403 GatedRepo instead of 401


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


class HubStub:
    """Start with `HubStub().start()`; `endpoint` is the value for HF_ENDPOINT. Stop with `stop()`."""

    def __init__(self) -> None:
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[Request] = []
        self.drop_once: set[str] = set()  # file paths whose first full GET is cut off halfway
        self.fail: set[str] = set()  # file paths whose GET answers 500 (a Hub outage mid-pull)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- repo set-up -------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], revision: str = "main", *,
                   token: str | None = None, gated: bool = False) -> str:
        """Add (or move) `revision` of `repo_id` to a new commit holding `files`; return its sha."""
        repo = self.repos.setdefault(repo_id, StubRepo())
        repo.token, repo.gated = token, gated
        h = hashlib.sha1(repo_id.encode() + revision.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + files[path])
        commit = h.hexdigest()
        repo.commits[commit] = dict(files)
        repo.refs[revision] = commit
        return commit

    # ---- server ------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "call start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStub:
        stub = self

        class Handler(_Handler):
            hub = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- what happened -----------------------------------------------------------------
    def file_gets(self, repo_id: str | None = None) -> list[str]:
        """Paths of repo files (and CDN blobs, as 'cdn:<sha256>') fetched with GET."""
        out = []
        for r in self.requests:
            if r.method != "GET":
                continue
            if "/resolve/" in r.path and (repo_id is None or r.path.startswith(f"/{repo_id}/")):
                out.append(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
            elif r.path.startswith("/cdn/"):
                out.append("cdn:" + r.path[5:])
        return out

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ---- helpers -----------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})})

    def _authorized(self, repo: StubRepo) -> bool:
        if repo.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {repo.token}":
            return True
        if repo.gated:
            self._error(403, "GatedRepo", "Access to this model is restricted; you must accept its conditions")
        else:
            self._error(401, "RepoNotFound", "Invalid username or password.")
        return False

    def _find(self, parts: list[str]) -> tuple[str, StubRepo] | None:
        repo_id = "/".join(parts[:2])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if not self._authorized(repo):
            return None
        return repo_id, repo

    def _commit(self, repo: StubRepo, rev: str) -> str | None:
        rev = unquote(rev)
        commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # ---- routes ------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        with self.hub._lock:
            self.hub.requests.append(Request(self.command, url.path, {k.lower(): v for k, v in self.headers.items()}))
        parts = [p for p in url.path.split("/") if p]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            found = self._find(parts[2:4])
            if found is None:
                return
            commit = self._commit(found[1], parts[5])
            if commit is None:
                return
            files = found[1].commits[commit]
            if parts[4] == "revision":
                info = {"id": found[0], "modelId": found[0], "sha": commit, "private": found[1].token is not None,
                        "gated": "manual" if found[1].gated else False,
                        "siblings": [{"rfilename": p} for p in sorted(files)]}
                return self._send(200, json.dumps(info).encode())
            prefix = unquote("/".join(parts[6:]))
            return self._send(200, json.dumps(self._tree(files, prefix)).encode())
        if parts and parts[0] == "cdn" and len(parts) == 2:
            for repo in self.hub.repos.values():
                for files in repo.commits.values():
                    for path, data in files.items():
                        if hashlib.sha256(data).hexdigest() == parts[1]:
                            return self._file(path, data, {"ETag": f'"{parts[1]}"'})
            return self._error(404, "EntryNotFound", "blob not found")
        if len(parts) >= 5 and parts[2] == "resolve":
            found = self._find(parts[:2])
            if found is None:
                return
            commit = self._commit(found[1], parts[3])
            if commit is None:
                return
            path = unquote("/".join(parts[4:]))
            data = found[1].commits[commit].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {commit}",
                                   {"X-Repo-Commit": commit})
            if path.endswith(LFS_SUFFIXES):
                # LFS files: the Hub answers with a redirect to its CDN and puts the blob's
                # sha256 and size in X-Linked-* headers (the CDN is another host: "localhost").
                sha = hashlib.sha256(data).hexdigest()
                port = self.server.server_address[1]
                headers = {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                           "ETag": f'"{git_blob_sha(data)}"', "Location": f"http://localhost:{port}/cdn/{sha}"}
                return self._send(302, b"", headers, "text/plain")
            return self._file(path, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha(data)}"'})
        self._error(404, "NotFound", f"no route for {url.path}")

    def _tree(self, files: dict[str, bytes], prefix: str) -> list[dict]:
        out = []
        for path in sorted(files):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            data = files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out

    def _file(self, name: str, data: bytes, headers: dict[str, str]) -> None:
        rng = self.headers.get("Range")
        if self.command == "GET" and name in self.hub.fail:
            return self._error(500, "InternalError", "the stub Hub is down for this file")
        if self.command == "GET" and rng is None and name in self.hub.drop_once:
            # Promise the whole file, send half, hang up: a network cut mid-download.
            self.hub.drop_once.discard(name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, "text/plain")
            chunk = data[start:end + 1]
            headers = {**headers, "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"}
            return self._send(206, chunk, headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")
