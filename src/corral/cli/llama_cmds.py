"""``corral llama-server``: install and path."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corral.cli.common import (
    _err,
    settings_from,
)
from corral.config import ConfigError

if TYPE_CHECKING:
    pass


def _progress_printer() -> Callable[[str, int, int], None]:
    """Progress for the build: a rich bar on a terminal, a line every 10% otherwise."""
    state: dict[str, Any] = {"stage": None, "last": -1, "bar": None, "task": None}
    interactive = sys.stderr.isatty()

    def show(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            if state["bar"] is not None:
                state["bar"].stop()
                state["bar"] = None
            state["stage"], state["last"] = stage, -1
            if interactive and stage in ("download", "build"):
                from rich.progress import Progress

                state["bar"] = Progress(transient=False)
                state["bar"].start()
                state["task"] = state["bar"].add_task(stage, total=total or None)
            else:
                sys.stderr.write(f"llama-server install: {stage}...\n")
        if state["bar"] is not None:
            state["bar"].update(state["task"], completed=done, total=total or None)
            if total and done >= total:
                state["bar"].stop()
                state["bar"] = None
        elif total:
            tenth = done * 10 // total
            if tenth != state["last"]:
                state["last"] = tenth
                sys.stderr.write(f"llama-server install: {stage} {done}/{total}\n")

    return show


def cmd_llama_server_install(args: argparse.Namespace) -> int:
    from corral.supervisor.binary import (
        BACKEND_VARIABLE,
        CMAKE_ARGS_VARIABLE,
        InstallError,
        NpmMissing,
        cached_binary,
        cached_ui,
        choose_backend,
        detect_backend,
        install_llama_server,
        install_ui,
    )

    if args.backend in (None, "auto"):
        detected = detect_backend()
        backend = detected.backend
        sys.stderr.write(f"llama-server install: backend {backend} (detected: {detected.why})\n")
    else:
        backend = args.backend
        sys.stderr.write(f"llama-server install: backend {backend}\n")
    environ = {**os.environ, BACKEND_VARIABLE: backend}
    started = time.monotonic()
    was_cached = cached_binary(environ=environ).is_file() and not args.force
    try:
        path = install_llama_server(
            force=args.force,
            jobs=args.jobs,
            index=args.index,
            progress=_progress_printer(),
            environ=environ,
        )
    except InstallError as exc:
        _err(str(exc))
        return 1
    if not os.environ.get(CMAKE_ARGS_VARIABLE):  # a side build (extra options) picks nothing
        choose_backend(backend, environ)
    state = "cached" if was_cached else f"built in {time.monotonic() - started:.0f} s"
    sys.stderr.write(f"llama-server {state}: {path}\n")
    if not args.no_ui:
        started = time.monotonic()
        ui_cached = (cached_ui(environ=environ) / "index.html").is_file() and not args.force
        try:
            ui = install_ui(
                force=args.force, index=args.index, progress=_progress_printer(), environ=environ
            )
        except NpmMissing as exc:
            # the server works without its page: say how to get it, and succeed
            sys.stderr.write(f"warning: {exc}\n")
        except InstallError as exc:
            _err(f"{exc}\nllama-server itself is installed; --no-ui skips the web UI")
            return 1
        else:
            state = "cached" if ui_cached else f"built in {time.monotonic() - started:.0f} s"
            sys.stderr.write(f"web UI {state}: {ui} (served by every llama-server it starts)\n")
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_llama_server_path(args: argparse.Namespace) -> int:
    from corral.supervisor.binary import LlamaServerNotFound, find_llama_server

    try:
        settings = settings_from(args)
        found = find_llama_server(args.llama_server or settings.llama_server)
    except (LlamaServerNotFound, ConfigError) as exc:
        _err(str(exc))
        return 1
    sys.stdout.write(f"{found.path}\n")
    if args.verbose:
        from corral.supervisor.binary import ui_beside

        sys.stderr.write(f"(found by {found.how})\n")
        if found.how == "cache":
            from corral.supervisor.binary import backend_of

            sys.stderr.write(f"backend: {backend_of()}\n")
        ui = ui_beside(found.path)
        sys.stderr.write(f"web UI: {ui}\n" if ui else "web UI: none beside it\n")
    return 0


# -- running servers ---------------------------------------------------------------------
