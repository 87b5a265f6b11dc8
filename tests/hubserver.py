"""A small stand-in for the Hugging Face Hub, for tests: the real huggingface_hub client talks to it over HTTP.

It speaks the part of the Hub's protocol that ``pgolf.data.hub`` makes the client use (read off the client's
source, huggingface_hub 1.33 and 2.4):

- ``GET  /api/datasets/{ns}/{name}/revision/{rev}``            repo info; ``sha`` is the commit the revision is at
- ``GET  /api/datasets/{ns}/{name}/tree/{rev}[/{folder}]``     folder listing, paginated (``Link: <...>; rel="next"``)
- ``POST /api/datasets/{ns}/{name}/paths-info/{rev}``          metadata of named paths (form field ``paths``, repeated)
- ``HEAD|GET /datasets/{ns}/{name}/resolve/{rev}/{path}``      a file: plain git files are served here (``ETag`` =
  git blob sha1); LFS files answer ``302`` to a "CDN" URL on another host name (``localhost`` instead of
  ``127.0.0.1``) with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, as the Hub does
- ``HEAD|GET /cdn/{sha256}``                                   the LFS bodies; honours ``Range: bytes=N-`` with ``206``

A repo may have several commits; branches can be moved while a test runs (``move_branch``, ``after_revision_lookup``).

Every response of the file API carries ``X-Repo-Commit``; errors carry ``X-Error-Code`` (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``) as the client expects. Every request is logged (``requests``), so tests can
count body transfers. Faults to inject: ``corrupt`` (serve wrong bytes of the right length for these repo paths)
and ``drop_after`` (on the first GET of a path, close the connection after that many body bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass(frozen=True)
class FakeFile:
    """A file of a fake repo; ``lfs`` files are described by sha256 and served through the "CDN"."""

    data: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def lfs_pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        """What git stores: the content for plain files, the pointer text for LFS files."""
        return git_blob_sha1(self.lfs_pointer if self.lfs else self.data)


class FakeRepo:
    """One commit of a dataset repo; ``branches`` point at it when the server starts.

    Give the server several FakeRepo with the same ``repo_id`` to have several commits (``HubServer.move_branch``).
    """

    def __init__(self, repo_id: str, files: dict[str, FakeFile], branches: tuple[str, ...] = ("main",)):
        self.repo_id = repo_id
        self.files = dict(files)
        self.branches = branches
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path].sha256.encode())
        self.commit = digest.hexdigest()

    def folders(self) -> set[str]:
        out = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return out

    def entry(self, path: str) -> Optional[dict]:
        """The API's JSON for one path (file or folder), or None."""
        if path in self.files:
            f = self.files[path]
            out = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": path}
            if f.lfs:
                out["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.lfs_pointer)}
            return out
        if path in self.folders():
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
        return None

    def children(self, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        paths = [p for p in self.files.keys() | self.folders() if p.startswith(prefix) and p != folder]
        if not recursive:
            paths = [p for p in paths if "/" not in p[len(prefix):]]
        entries = [self.entry(p) for p in paths]
        return sorted(entries, key=lambda e: (e["type"] != "directory", e["path"]))  # folders first, like the Hub


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    kind: str  # "api" | "resolve" | "cdn" | "other"
    path: str  # URL path, unquoted
    range: Optional[str]
    status: int
    body_bytes: int  # file-body bytes sent (0 for API responses and HEAD)


class HubServer:
    """Threaded HTTP server on 127.0.0.1 (free port) serving ``repos``; use as a context manager."""

    def __init__(self, repos: list[FakeRepo], *, page_size: int = 1000):
        self.commits: dict[str, dict[str, FakeRepo]] = {}  # repo id -> commit sha -> content
        self.branches: dict[tuple[str, str], str] = {}  # (repo id, branch) -> commit sha
        for repo in repos:
            self.commits.setdefault(repo.repo_id, {})[repo.commit] = repo
            for branch in repo.branches:
                self.branches[(repo.repo_id, branch)] = repo.commit
        self.after_revision_lookup: Optional[Callable[[], None]] = None  # called after each repo-info answer
        self.page_size = page_size
        self.corrupt: set[str] = set()  # repo paths whose body bytes are served altered
        self.drop_after: dict[str, int] = {}  # repo path -> body bytes sent before the connection is cut (once)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle
    def start(self) -> "HubServer":
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        """Another host name for the same server: the client treats it as a foreign (CDN) host."""
        return f"http://localhost:{self.port}"

    # --- repo state
    def move_branch(self, repo_id: str, branch: str, commit: str) -> None:
        if commit not in self.commits.get(repo_id, {}):
            raise KeyError(f"{repo_id} has no commit {commit}")
        with self._lock:
            self.branches[(repo_id, branch)] = commit

    def resolve(self, repo_id: str, revision: str) -> Optional[FakeRepo]:
        """The content of ``revision`` (branch or full commit sha) of ``repo_id``, or None."""
        commits = self.commits.get(repo_id, {})
        with self._lock:
            commit = self.branches.get((repo_id, revision), revision)
        return commits.get(commit)

    # --- inspection
    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def body_gets(self, name: Optional[str] = None) -> list[Request]:
        """GET requests that transferred file bytes (optionally only those for a file of that base name)."""
        with self._lock:
            hits = [r for r in self.requests if r.method == "GET" and r.kind in ("resolve", "cdn") and r.body_bytes > 0]
        if name is not None:
            hits = [r for r in hits if self.repo_path_of(r).rsplit("/", 1)[-1] == name]
        return hits

    def repo_path_of(self, request: Request) -> str:
        if request.kind == "cdn":
            found = self.find_sha256(request.path.rsplit("/", 1)[-1])
            return found[1] if found else ""
        return request.path.split("/resolve/", 1)[1].split("/", 1)[1] if "/resolve/" in request.path else ""

    def find_sha256(self, sha256: str) -> Optional[tuple[FakeRepo, str]]:
        for repo in (r for commits in self.commits.values() for r in commits.values()):
            for path, f in repo.files.items():
                if f.lfs and f.sha256 == sha256:
                    return repo, path
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own
    hub: HubServer  # set on the bound subclass

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    # --- responses
    def _send(self, status: int, headers: dict, body: bytes = b"", *, kind: str, file_body: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(headers.get("Content-Length", len(body))))
        self.end_headers()
        sent = 0
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            sent = len(body)
        self.hub.log(Request(self.command, kind, unquote(urlsplit(self.path).path), self.headers.get("Range"), status,
                             sent if file_body else 0))

    def _json(self, status: int, obj, headers: Optional[dict] = None) -> None:
        body = json.dumps(obj).encode()
        self._send(status, {"Content-Type": "application/json", **(headers or {})}, body, kind="api")

    def _error(self, status: int, code: str, kind: str, headers: Optional[dict] = None) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(status, {"X-Error-Code": code, "Content-Type": "application/json", **(headers or {})}, body,
                   kind=kind)

    def _file_body(self, data: bytes, repo_path: str, headers: dict, kind: str) -> None:
        """200 or 206 with (possibly altered / cut) bytes of a file."""
        if repo_path in self.hub.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        total = len(data)
        start = 0
        status = 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes="):].partition("-")
            start = int(first)
            end = int(last) if last else total - 1
            data = data[start: end + 1]
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        cut = self.hub.drop_after.pop(repo_path, None) if self.command == "GET" else None
        if cut is None:
            self._send(status, headers, data, kind=kind, file_body=True)
            return
        # announce the whole body, send part of it, then hang up: the client sees a truncated transfer
        self.send_response(status)
        for key, value in {**headers, "Content-Length": len(data)}.items():
            self.send_header(key, str(value))
        self.end_headers()
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.hub.log(Request("GET", kind, unquote(urlsplit(self.path).path), range_header, status, cut))
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    # --- routing
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.split("/")  # split before unquoting: the client quotes revisions and folders with safe=""
        query = parse_qs(url.query)
        body = b""
        if self.command == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if len(parts) >= 7 and parts[1] == "api" and parts[2] == "datasets":
            self._api(parts, query, body)
        elif len(parts) >= 7 and parts[1] == "datasets" and parts[4] == "resolve":
            self._resolve(parts)
        elif len(parts) == 3 and parts[1] == "cdn":
            self._cdn(parts[2])
        else:
            self._error(404, "NotFound", "other")

    def _repo(self, namespace: str, name: str, revision: str, kind: str) -> Optional[tuple[FakeRepo, str]]:
        repo_id = f"{unquote(namespace)}/{unquote(name)}"
        if repo_id not in self.hub.commits:
            self._error(404, "RepoNotFound", kind)
            return None
        repo = self.hub.resolve(repo_id, unquote(revision))
        if repo is None:
            self._error(404, "RevisionNotFound", kind)
            return None
        return repo, repo.commit

    def _api(self, parts: list[str], query: dict, body: bytes) -> None:
        found = self._repo(parts[3], parts[4], parts[6], "api")
        if found is None:
            return
        repo, commit = found
        action = parts[5]
        if action == "revision" and len(parts) == 7:
            self._json(200, {
                "_id": commit[:24], "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit,
                "lastModified": "2026-01-01T00:00:00.000Z", "private": False, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": [{"rfilename": p} for p in sorted(repo.files)],
            })
            if self.hub.after_revision_lookup is not None:
                self.hub.after_revision_lookup()
        elif action == "tree":
            self._tree(repo, commit, unquote("/".join(parts[7:])).strip("/"), query)
        elif action == "paths-info" and self.command == "POST":
            form = parse_qs(body.decode())
            entries = [repo.entry(p.strip("/")) for p in form.get("paths", [])]
            self._json(200, [e for e in entries if e is not None], {"X-Repo-Commit": commit})
        else:
            self._error(404, "NotFound", "api")

    def _tree(self, repo: FakeRepo, commit: str, folder: str, query: dict) -> None:
        if folder and folder not in repo.folders():
            self._error(404, "EntryNotFound", "api", {"X-Repo-Commit": commit})
            return
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = repo.children(folder, recursive)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start: start + self.hub.page_size]
        headers = {"X-Repo-Commit": commit}
        if start + self.hub.page_size < len(entries):
            next_query = f"recursive={str(recursive).lower()}&expand=false&cursor={start + self.hub.page_size}"
            folder_part = f"/{quote(folder, safe='')}" if folder else ""
            url = f"{self.hub.endpoint}/api/datasets/{repo.repo_id}/tree/{commit}{folder_part}?{next_query}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(200, page, headers)

    def _resolve(self, parts: list[str]) -> None:
        found = self._repo(parts[2], parts[3], parts[5], "resolve")
        if found is None:
            return
        repo, commit = found
        repo_path = unquote("/".join(parts[6:]))
        f = repo.files.get(repo_path)
        if f is None:
            self._error(404, "EntryNotFound", "resolve", {"X-Repo-Commit": commit})
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.git_oid}"'}
        if f.lfs:
            headers.update({
                "Location": f"{self.hub.cdn}/cdn/{f.sha256}",
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": len(f.data),
            })
            self._send(302, headers, kind="resolve")
        else:
            self._file_body(f.data, repo_path, headers, "resolve")

    def _cdn(self, sha256: str) -> None:
        found = self.hub.find_sha256(sha256)
        if found is None:
            self._error(404, "NotFound", "cdn")
            return
        repo, repo_path = found
        self._file_body(repo.files[repo_path].data, repo_path, {"ETag": f'"{sha256}"'}, "cdn")
