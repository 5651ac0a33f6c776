"""Processes the harness starts: each in its own process group, all stopped on exit.

Every server the benchmark needs is started from an argument list (never a shell)
with ``start_new_session=True`` so one ``killpg`` reaches everything it spawned, and
with the Linux parent-death signal so a harness killed with SIGKILL still takes its
direct children with it. A module-level registry stops whatever is still running when
the interpreter exits, when SIGTERM arrives, or when a workload raises. Stopping also
sweeps descendants that moved to a process group of their own (corral's and the
router's llama-server children do), so no run leaves an orphan listening on a port.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

import psutil

PR_SET_PDEATHSIG = 1
STOP_GRACE = 10.0

_running: dict[int, ManagedProcess] = {}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ManagedProcess:
    """One child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_path
        self.env = {**os.environ, **env} if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _running[self.popen.pid] = self
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def descendants(self) -> list[psutil.Process]:
        if not self.alive():
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def cpu_seconds(self) -> float:
        """User and system CPU time this process and its live descendants have used."""
        if not self.alive():
            return 0.0
        total = 0.0
        try:
            procs = [psutil.Process(self.pid), *self.descendants()]
        except psutil.Error:
            return 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM the group, wait ``grace`` s, SIGKILL it, then sweep stray descendants."""
        if self.popen is None:
            return None
        stray = self.descendants()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        code = self.popen.wait()
        deadline = time.monotonic() + grace
        for proc in stray:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.terminate()
        for proc in stray:
            with contextlib.suppress(psutil.Error):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in stray:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
        _running.pop(self.popen.pid, None)
        return code


def stop_all() -> None:
    """Stop every process the harness started and has not stopped yet, newest first."""
    for proc in reversed(list(_running.values())):
        proc.stop(grace=3.0)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Stop all children at interpreter exit and turn SIGTERM/SIGHUP into an exit."""
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)


def run_text(
    args: Sequence[str | os.PathLike[str]],
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> str:
    """stdout and stderr of a short command, for version strings; "" if it can't run."""
    try:
        done = subprocess.run(
            [str(a) for a in args],
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).decode("utf-8", errors="replace").strip()
