"""One child process (usually llama-server): start, capture its output, stop it.

Children are started from argument lists (never a shell), each in its own process
group so a stop reaches everything it spawned, with the Linux parent-death signal
set so that a corral killed with SIGKILL still takes its children with it. Output
(stdout and stderr together) goes to a bounded ring of lines, readable while it runs.
Stopping sends SIGTERM to the group, waits, then SIGKILLs the group; a port or memory
counts as free only once the process has exited.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
DEFAULT_LOG_LINES = 2000


_SETPRIV = shutil.which("setpriv")


def _with_parent_death_signal(
    args: list[str],
) -> tuple[list[str], Callable[[], None] | None]:
    """The command line and pre-exec hook that make the child die with corral.

    util-linux's ``setpriv --pdeathsig KILL`` sets the signal and then execs the
    program (same pid, no shell). Without it, a ``preexec_fn`` does the same, but that
    makes Python fork the whole interpreter and run Python code in the child, which
    blocked the event loop for 50-160 ms per spawn in the readiness benchmark.
    """
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *args], None
    return args, _set_parent_death_signal


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """In the child before exec: die with SIGKILL when the parent (corral) dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


#: Rotated log files kept beside the current one (``NAME.log.1`` ... ``NAME.log.N``).
LOG_FILES_KEPT = 5
#: A log file is rotated at start when it is larger than this.
LOG_ROTATE_BYTES = 16 * 1024 * 1024


def _rotate(path: Path) -> None:
    """Shift ``path`` to ``path.1`` (and older ones up) when it has grown too large."""
    try:
        if path.stat().st_size < LOG_ROTATE_BYTES:
            return
    except FileNotFoundError:
        return
    for index in range(LOG_FILES_KEPT - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{index + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


class PortLease:
    """A loopback port held for one llama-server across its restarts.

    Other corral processes on the host skip it: the lease is an exclusive ``flock`` on
    ``LOCK_DIR/PORT.lock``, held while this object lives and released by the kernel if
    the process dies. (A free-port probe alone races: two agents starting together
    would pick the same port before either server binds it.)
    """

    def __init__(self, port: int, handle: BinaryIO) -> None:
        self.port = port
        self._handle: BinaryIO | None = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the lock
            self._handle = None


def lease_port(ports: range, lock_dir: Path, host: str = "127.0.0.1") -> PortLease:
    """Lease the first port in ``ports`` that no corral process holds and nothing
    listens on."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for port in ports:
        handle = open(lock_dir / f"{port}.lock", "wb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                handle.close()
                continue
        return PortLease(port, handle)
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


class LogRing:
    """The last ``size`` output lines, with a cursor: the count of lines ever added."""

    def __init__(self, size: int = DEFAULT_LOG_LINES) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.count = 0
        self.listeners: list[Callable[[str], None]] = []
        """Called with every new line (e.g. to notice "model loaded" at once)."""

    def append(self, line: str) -> None:
        self.lines.append(line)
        self.count += 1
        for listener in self.listeners:
            listener(line)

    def tail(self, n: int) -> list[str]:
        return list(self.lines)[-n:] if n > 0 else []

    def since(self, cursor: int) -> tuple[list[str], int]:
        """Lines added after ``cursor`` that are still kept, and the next cursor."""
        first_kept = self.count - len(self.lines)
        start = max(cursor, first_kept) - first_kept
        return list(self.lines)[start:], self.count


class ChildProcess:
    """A supervised child process with its recent output."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        name: str = "child",
        log_lines: int = DEFAULT_LOG_LINES,
        log_path: Path | None = None,
        output: LogRing | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.env = dict(env) if env is not None else None
        self.name = name
        self.output = output if output is not None else LogRing(log_lines)
        """Recent output lines; a supervisor passes one ring to every restart."""
        self.log_path = log_path
        self.log_file: BinaryIO | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        env = {**os.environ, **self.env} if self.env is not None else None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            _rotate(self.log_path)
            # local log file: opening and appending are short, bounded disk operations
            self.log_file = open(self.log_path, "ab")  # noqa: ASYNC230
        args, preexec = _with_parent_death_signal(self.args)
        self.process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,
        )
        log.info("started name=%s pid=%s", self.name, self.process.pid)
        self._reader = asyncio.create_task(self._read_output(), name=f"{self.name}-output")

    async def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        stream = self.process.stdout
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the stream limit: keep its start
                line = await stream.read(64 * 1024)
            if not line:
                return
            self.output.append(line.decode("utf-8", errors="replace").rstrip("\n"))
            if self.log_file is not None:
                self.log_file.write(line)
                self.log_file.flush()

    def tail(self, n: int = 20) -> list[str]:
        return self.output.tail(n)

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        return code

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await self.process.wait()
            except TimeoutError:
                log.warning("no exit after SIGTERM name=%s grace=%.1f; SIGKILL", self.name, grace)
                self._signal_group(signal.SIGKILL)
        code = await self.wait()
        # anything left in the group (the child's own children) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        log.info("stopped name=%s pid=%s code=%s", self.name, self.process.pid, code)
        return code
