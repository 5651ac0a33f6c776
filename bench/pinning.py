"""CPU pinning: keep the proxy under test and what it talks to off each other's core.

On a 2-core machine, a llama-server computing with every core (its default) and a proxy
relaying its answers take turns on the same cores, and the proxy's added latency
becomes mostly waiting for a core. Production deployments keep them apart (inference
on a GPU or its own cores, the proxy on the CPU), so the workloads that measure a
proxy give it :data:`PROXY_CORE` and put everything else on :data:`OTHER_CORE`.

Processes are pinned thread by thread (``sched_setaffinity`` on every task under
``/proc/PID/task``), so threads a server already started move too; threads it starts
later inherit the setting. On a machine with fewer than two cores nothing is pinned.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import psutil

PROXY_CORE = 0
OTHER_CORE = 1


def available() -> bool:
    """Whether there are two cores to split (and the OS lets us pin)."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def taskset(core: int, args: list[str]) -> list[str]:
    """``args`` started on ``core`` alone (through util-linux ``taskset``)."""
    found = shutil.which("taskset")
    if found is None or not available():
        return args
    return [found, "-c", str(core), *args]


def pin_process(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` onto ``cores``; a thread that ended meanwhile is skipped."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = [str(pid)]
    for task in tasks:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cores)


def pin_tree(pid: int, proxy_core: int, other_core: int, llama_server: str) -> list[str]:
    """Pin ``pid`` and its descendants: llama-server processes (their executable is
    ``llama_server``'s name) on ``other_core``, the rest, and a llama-server in router
    mode (one with llama-server children), on ``proxy_core``. Returns a line per
    process, for the log."""
    if not available():
        return []
    name = os.path.basename(llama_server)
    done = []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    commands: dict[int, list[str]] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            commands[proc.pid] = proc.cmdline()

    def is_llama(pid: int) -> bool:
        cmdline = commands.get(pid) or ["?"]
        return os.path.basename(cmdline[0]) == name

    for proc in procs:
        if proc.pid not in commands:
            continue
        cmdline = commands[proc.pid] or ["?"]
        try:
            router = any(is_llama(c.pid) for c in proc.children())  # router mode
        except psutil.Error:
            router = False
        core = other_core if is_llama(proc.pid) and not router else proxy_core
        pin_process(proc.pid, {core})
        done.append(f"{proc.pid} {os.path.basename(cmdline[0])} -> core {core}")
    return done


@contextlib.contextmanager
def this_process_on(core: int) -> Iterator[None]:
    """Run the bench itself (the load generator) on ``core`` for the block."""
    if not available():
        yield
        return
    before = os.sched_getaffinity(0)
    pin_process(os.getpid(), {core})
    try:
        yield
    finally:
        pin_process(os.getpid(), before)
