"""A fake Hugging Face hub: enough of its HTTP API for huggingface_hub to download from.

``corral models pull`` is tested with the real ``huggingface_hub`` library against this
real HTTP server (``HF_ENDPOINT`` points at it), because the hub is not reachable from
tests. It answers what huggingface_hub 2.x asks, the way huggingface.co answers:

* ``GET /api/models/ORG/NAME[/revision/REV]`` (``HfApi.model_info``): ``id``, ``sha``
  (the commit), ``gated``, ``private`` and ``siblings`` with ``rfilename``, ``size``,
  ``blobId`` and, for GGUF files, ``lfs`` (``sha256``, ``size``).
* ``HEAD``/``GET /ORG/NAME/resolve/REV/PATH`` (``hf_hub_download``): every answer has
  ``X-Repo-Commit``. A GGUF file is an LFS file: ``302`` to the "CDN" (a second port,
  so another origin, which huggingface_hub does not follow on ``HEAD`` and sends no
  token to) with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``. Other files are
  answered directly with the git blob id as ``ETag``.
* Errors carry the hub's ``X-Error-Code`` headers, which huggingface_hub turns into its
  exceptions: an unknown repo is ``401 RepoNotFound`` (what the hub tells a client
  without a token), an unknown revision ``404 RevisionNotFound``, an unknown file
  ``404 EntryNotFound``. A gated repo lists its files to anyone but answers a download
  ``401 GatedRepo`` without a token and ``403 GatedRepo`` with one it does not allow.
  A token the hub does not know is ``401`` "Invalid credentials in Authorization header".

It runs its own event loop in a daemon thread (:meth:`FakeHub.start`), so synchronous
code and subprocesses can use it alike; :attr:`FakeHub.requests` records every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeHub", "FakeRepo", "HubRequest"]


@dataclass(slots=True)
class FakeRepo:
    """A repo: branch name -> {path in repo: content}; gated repos allow some tokens."""

    branches: dict[str, dict[str, bytes]]
    gated: bool = False
    allowed_tokens: frozenset[str] = frozenset()

    def commit(self, branch: str) -> str:
        """A stable 40-hex commit id for a branch's files."""
        digest = hashlib.sha1(branch.encode())
        for name, content in sorted(self.branches[branch].items()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
        return digest.hexdigest()

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit, files) for a branch name or a commit id; None if neither."""
        for branch, files in self.branches.items():
            if revision in (branch, self.commit(branch)):
                return self.commit(branch), files
        return None


@dataclass(frozen=True, slots=True)
class HubRequest:
    method: str
    path: str
    origin: str
    """``hub`` or ``cdn``."""
    authorized: bool
    """Whether an ``Authorization`` header came with it."""


def _is_lfs(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _error(status: int, code: str | None, message: str, **headers: str) -> web.Response:
    extra = {"X-Error-Message": message, **headers}
    if code:
        extra["X-Error-Code"] = code
    return web.json_response({"error": message}, status=status, headers=extra)


@dataclass
class FakeHub:
    """The fake hub; add repos with :meth:`add`, then :meth:`start` (or ``with``)."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    tokens: frozenset[str] = frozenset()
    """Tokens the hub knows; any other token sent is refused with 401."""
    requests: list[HubRequest] = field(default_factory=list)
    host: str = "127.0.0.1"
    hub_port: int = 0
    cdn_port: int = 0
    _blobs: dict[str, bytes] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    def add(
        self,
        repo: str,
        files: Mapping[str, bytes],
        *,
        branch: str = "main",
        gated: bool = False,
        allowed_tokens: frozenset[str] = frozenset(),
    ) -> FakeRepo:
        """Add (or extend with another branch) a repo; returns it."""
        existing = self.repos.get(repo)
        if existing is None:
            existing = self.repos[repo] = FakeRepo({}, gated, allowed_tokens)
        existing.branches[branch] = dict(files)
        for content in files.values():
            self._blobs[hashlib.sha256(content).hexdigest()] = content
        return existing

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.hub_port}"

    # -- serving ---------------------------------------------------------------------

    def _record(self, request: web.Request, origin: str) -> None:
        authorized = "Authorization" in request.headers
        self.requests.append(HubRequest(request.method, request.path, origin, authorized))

    def _token_problem(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if auth and auth.removeprefix("Bearer ").strip() not in self.tokens:
            return _error(401, None, "Invalid credentials in Authorization header")
        return None

    async def _model_info(self, request: web.Request) -> web.Response:
        self._record(request, "hub")
        refused = self._token_problem(request)
        if refused is not None:
            return refused
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(401, "RepoNotFound", "Repository not found")
        found = repo.files_at(request.match_info.get("revision", "main"))
        if found is None:
            return _error(404, "RevisionNotFound", "Invalid rev id")
        commit, files = found
        siblings: list[dict[str, Any]] = []
        for name, content in sorted(files.items()):
            sibling: dict[str, Any] = {
                "rfilename": name,
                "size": len(content),
                "blobId": _git_blob_id(content),
            }
            if _is_lfs(name):
                digest = hashlib.sha256(content).hexdigest()
                sibling["lfs"] = {"sha256": digest, "size": len(content), "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response(
            {
                "_id": commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": ["gguf"],
                "library_name": "gguf",
                "siblings": siblings,
            }
        )

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "hub")
        refused = self._token_problem(request)
        if refused is not None:
            return refused
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(401, "RepoNotFound", "Repository not found")
        found = repo.files_at(request.match_info["revision"])
        if found is None:
            return _error(404, "RevisionNotFound", "Invalid rev id")
        commit, files = found
        if repo.gated:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not token:
                return _error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                    **{"X-Repo-Commit": commit},
                )
            if token not in repo.allowed_tokens:
                return _error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the "
                    "authorized list.",
                    **{"X-Repo-Commit": commit},
                )
        name = request.match_info["path"]
        content = files.get(name)
        if content is None:
            return _error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": commit})
        if _is_lfs(name):
            digest = hashlib.sha256(content).hexdigest()
            location = f"http://{self.host}:{self.cdn_port}/blobs/{digest}"
            return web.Response(
                status=302,
                headers={
                    "Location": location,
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{digest}"',
                    "X-Linked-Size": str(len(content)),
                    "ETag": f'"{_git_blob_id(content)}"',
                },
                text=f"Found. Redirecting to {location}",
            )
        return web.Response(
            body=content,
            headers={"X-Repo-Commit": commit, "ETag": f'"{_git_blob_id(content)}"'},
        )

    async def _cdn(self, request: web.Request) -> web.Response:
        self._record(request, "cdn")
        content = self._blobs.get(request.match_info["digest"])
        if content is None:
            return web.Response(status=404, text="NoSuchKey")
        return web.Response(body=content, content_type="application/octet-stream")

    def _app(self) -> web.Application:
        app = web.Application()
        repo = "/{org}/{name}"
        app.router.add_get(f"/api/models{repo}", self._model_info)
        app.router.add_get(f"/api/models{repo}/revision/{{revision}}", self._model_info)
        app.router.add_get(f"{repo}/resolve/{{revision}}/{{path:.+}}", self._resolve)
        app.router.add_get("/blobs/{digest}", self._cdn)
        return app

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeHub:
        """Listen on two free loopback ports (hub and CDN) from a daemon thread."""
        ready = threading.Event()
        failure: list[BaseException] = []
        hub_sock, cdn_sock = (socket.socket(), socket.socket())
        for sock in (hub_sock, cdn_sock):
            sock.bind((self.host, 0))
        self.hub_port, self.cdn_port = hub_sock.getsockname()[1], cdn_sock.getsockname()[1]

        async def serve() -> None:
            self._runner = web.AppRunner(self._app())
            await self._runner.setup()
            for sock in (hub_sock, cdn_sock):
                await web.SockSite(self._runner, sock).start()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(serve())
            except BaseException as exc:  # reported to start(), which raises it
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-hf-hub", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=30):
            raise RuntimeError("the fake hub did not start in 30 s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread, runner = self._loop, self._thread, self._runner
        if loop is None or thread is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
