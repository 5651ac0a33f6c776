"""nginx from Debian as a plain reverse proxy: the floor for "any proxy at all".

Round-robin upstream (nginx's default) over the one llama-server, upstream keep-alive,
``proxy_buffering off`` so streams pass through as they come, one worker. Because
llama-server closes a connection after a stream while advertising keep-alive, a
request that lands on such a dead pooled connection is retried
(``proxy_next_upstream error timeout non_idempotent``), as corral resends one.
Over several llama-servers (:func:`start_proxy`), each is a ``server ...
max_fails=0``: by default one such dead connection would count as a failure and take
that server out of the rotation for 10 s, which is not round robin any more.
Skipped, with a note, where nginx is not installed (CI doesn't run the bench).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.context import BenchContext, wait_healthy
from bench.procs import ManagedProcess, free_port, run_text
from bench.systems.base import Endpoint, System, start_llama_server

CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream llama {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
}}
"""


def nginx_binary() -> Path | None:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )
    return Path(found) if found else None


def proxy_config(prefix: Path, backends: Sequence[str], port: int) -> str:
    """:data:`CONFIG` for nginx listening on ``port``, files under ``prefix``, the
    ``backends`` (base URLs) as one round-robin upstream, never marked failed (nginx
    ignores ``max_fails`` for a lone server)."""
    servers = "\n".join(
        f"        server {b.removeprefix('http://')} max_fails=0;" for b in backends
    )
    return CONFIG.format(dir=prefix, servers=servers, port=port)


def nginx_args(prefix: Path, conf: Path) -> list[str]:
    binary = nginx_binary()
    assert binary is not None
    return [str(binary), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]


async def start_proxy(
    ctx: BenchContext,
    name: str,
    backends: Sequence[str],
    spawn: Callable[[ManagedProcess], ManagedProcess],
) -> str:
    """Start nginx (:data:`CONFIG`, round robin over ``backends``) through ``spawn``,
    files under the run's ``name/``; return its URL once it answers ``/health``."""
    prefix = ctx.run_dir / name
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(proxy_config(prefix, backends, port), encoding="utf-8")
    proc = spawn(ManagedProcess(name, nginx_args(prefix, conf), ctx.log_path(name)))
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(f"{url}/health", what=f"{name} → llama-server /health", proc=proc)
    return url


class Nginx(System):
    name = "nginx"
    label = "nginx (plain proxy)"

    def unavailable(self, ctx: BenchContext) -> str | None:
        if nginx_binary() is None:
            return "nginx is not installed (`apt-get install -y nginx` to include it)"
        return None

    async def start(self, ctx: BenchContext) -> Endpoint:
        backend = await start_llama_server(self, ctx, "nginx-llama-server")
        url = await start_proxy(ctx, "nginx", [backend], self.spawn)
        return Endpoint(url=url, backend_url=backend, model=ctx.model_name)

    def observations(self, ctx: BenchContext) -> list[str]:
        try:
            text = (ctx.run_dir / "nginx" / "error.log").read_text(errors="replace")
        except OSError:
            return []
        closed = text.count("upstream prematurely closed connection")
        if not closed:
            return []
        return [
            f"nginx found {closed} pooled upstream connections already closed by "
            "llama-server and resent those requests (`proxy_next_upstream ... "
            "non_idempotent`)."
        ]

    def version(self, ctx: BenchContext) -> str:
        binary = nginx_binary()
        if binary is None:
            return "not installed"
        return run_text([binary, "-v"]).removeprefix("nginx version:").strip()

    def setup(self, ctx: BenchContext) -> str:
        return (
            "one worker, upstream round-robin with `keepalive 16`, `proxy_buffering off`, "
            "`proxy_next_upstream error timeout non_idempotent`, access log on"
        )
