"""One supervised llama-server: launch, readiness, restart with backoff, failure, stop.

States follow ARCHITECTURE.md: ``starting -> ready -> (draining) -> stopped``, or
``failed``. Readiness polls ``/health`` every ``ready_poll`` seconds from launch (the
server answers 503 while loading) and notices at once when the process exits first;
after ``startup_timeout`` the start has failed, with the last log lines in the error.

An unexpected exit restarts the server at once the first time (requests are waiting
for it, and one crash says little), then after a backoff that starts at
``backoff_initial`` and doubles up to ``backoff_max``; the streak starts over once the
server has stayed up for ``backoff_reset_after``. ``max_failures`` failures (crashes or
failed starts) within ``failure_window`` seconds mark it ``failed`` for good, with the
exit code and the last log lines; a manual :meth:`restart` clears that. A server that
has never been ready is given up sooner, after ``start_attempts`` failed starts in a
row: bad arguments or a bad file fail the same way every time, and a crash loop would
only hold up whoever waits for it. Every state change calls
``on_change`` so whoever reports the instance (the agent) can do so at once.

:meth:`as_dict` carries cumulative counts over the supervisor's life (``launches``,
``restarts``, ``failed_runs``, ``readies``) and the last startup times, so a balancer
can count starts, restarts, failures and startup durations from reports that may
skip states (see :mod:`corral.observe.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from corral.config import Settings
from corral.protocol import DeviceReport, SupervisorReport
from corral.supervisor.devices import OutOfMemory, nvml_memory, out_of_memory
from corral.supervisor.process import ChildProcess, LogRing

log = logging.getLogger(__name__)


#: Lines llama-server logs when it becomes ready ("srv llama_server: model loaded",
#: then "... listening on ..."): seeing one triggers a /health check at once instead of
#: waiting for the next poll.
READY_MARKERS = ("model loaded", "listening on", "server is listening")

#: Startup times :meth:`SupervisedInstance.as_dict` reports (the most recent ones).
STARTUP_TIMES_KEPT = 8


@dataclass
class SupervisorOptions:
    """Tunables of one supervised server; the defaults are the documented ones."""

    startup_timeout: float = 120.0
    """Seconds from launch until ``/health`` must answer 200."""
    ready_poll: float = 0.05
    """Seconds between ``/health`` polls while starting."""
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    backoff_reset_after: float = 60.0
    """Seconds up after which the next crash starts the backoff over."""
    max_failures: int = 5
    failure_window: float = 300.0
    start_attempts: int = 2
    """Failed starts in a row after which a server that was never ready is ``failed``."""
    stop_grace: float = 10.0
    """Seconds between SIGTERM and SIGKILL when stopping."""


def supervisor_options(settings: Settings) -> SupervisorOptions:
    """How supervised servers start, restart and stop, as ``settings`` say."""
    return SupervisorOptions(
        startup_timeout=settings.startup_timeout,
        backoff_initial=settings.restart_backoff_initial,
        backoff_max=settings.restart_backoff_max,
        max_failures=settings.restart_max_failures,
        failure_window=settings.restart_failure_window,
        start_attempts=settings.start_attempts,
        stop_grace=settings.stop_grace,
    )


class SupervisedInstance:
    """Keeps one server process running and says what state it is in."""

    def __init__(
        self,
        args: Sequence[str],
        health_url: str,
        *,
        name: str = "llama-server",
        options: SupervisorOptions | None = None,
        on_change: Callable[[SupervisedInstance], None] | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.args = list(args)
        self.tls = tls
        """What an ``https://`` health URL is verified with (None: the system's store)."""
        self.devices: tuple[DeviceReport, ...] = ()
        """The accelerators the binary can use (:mod:`corral.supervisor.devices`)."""
        self.env = dict(env) if env else None
        """Extra environment for the process (on top of corral's own)."""
        self.health_url = health_url
        self.name = name
        self.options = options or SupervisorOptions()
        self.on_change = on_change
        self.state = "stopped"
        self.child: ChildProcess | None = None
        self.output = LogRing()
        """Output of every run of the process, across restarts."""
        self._ready_hint = asyncio.Event()
        self.output.listeners.append(self._watch_line)
        self.log_path = log_path
        self.restarts = 0
        self.launches = 0
        """Processes launched, first start and restarts."""
        self.failed_runs = 0
        """Runs that exited unexpectedly or did not become ready."""
        self.readies = 0
        """Times a launched process became ready."""
        self.startup_seconds: deque[float] = deque(maxlen=STARTUP_TIMES_KEPT)
        """Seconds from launch to ready of the last starts."""
        self.last_exit_code: int | None = None
        self.last_error = ""
        self.out_of_memory: OutOfMemory | None = None
        """The failed allocation that kept the last run from starting, if that was it:
        a server that ran out of memory is not restarted into the same wall."""
        self.failures: deque[float] = deque()
        self.started_at: float | None = None
        self.ready_since: float | None = None
        """Wall-clock time the current run became ready (uptime, for people)."""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._settled = asyncio.Event()

    def _watch_line(self, line: str) -> None:
        if any(marker in line for marker in READY_MARKERS):
            self._ready_hint.set()

    # -- state ----------------------------------------------------------------------------

    def _set(self, state: str, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state == self.state and error is None:
            return
        self.state = state
        if state == "starting":
            self._settled.clear()
        else:
            self._settled.set()
        log.info("instance state name=%s state=%s", self.name, state)
        if self.on_change is not None:
            self.on_change(self)

    def report(self) -> SupervisorReport:
        """What the agent reports of this process (see :class:`SupervisorReport`)."""
        return SupervisorReport(
            state=self.state,
            pid=self.child.pid if self.child else None,
            restarts=self.restarts,
            launches=self.launches,
            failed_runs=self.failed_runs,
            readies=self.readies,
            startup_seconds=tuple(round(t, 6) for t in self.startup_seconds),
            last_exit_code=self.last_exit_code,
            last_error=self.last_error,
            ready_since=self.ready_since if self.state == "ready" else None,
            log_tail=tuple(self.child.tail(20)) if self.child else (),
            devices=self._live_devices(),
        )

    def _live_devices(self) -> tuple[DeviceReport, ...]:
        """The devices, with NVML's live total and free memory where it can read them
        (the listing's figures are from when the binary was first asked)."""
        if not self.devices:
            return ()
        live = nvml_memory({**os.environ, **(self.env or {})})
        if not live:
            return self.devices
        return tuple(
            dataclasses.replace(d, total_mib=live[d.name][0] >> 20, free_mib=live[d.name][1] >> 20)
            if d.name in live
            else d
            for d in self.devices
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Begin supervising (returns at once; watch ``state`` or ``on_change``)."""
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        self.failures.clear()
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def wait_ready(self) -> bool:
        """Wait until ready (True) or failed/stopped (False)."""
        await self._settled.wait()
        return self.state == "ready"

    async def restart(self) -> None:
        """Stop the server (gracefully) and start it again; clears a ``failed`` state."""
        await self.stop()
        self.restarts += 1
        self.start()

    async def stop(self) -> None:
        """SIGTERM, wait ``stop_grace``, SIGKILL; ``stopped`` once the process is gone."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.child is not None and self.child.running():
            self.last_exit_code = await self.child.stop(self.options.stop_grace)
        self._set("stopped")

    # -- the loop -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = self.options.backoff_initial
        streak = 0  # failures since the server last stayed up for backoff_reset_after
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=2.0),
            connector=aiohttp.TCPConnector(
                force_close=True, ssl=self.tls if self.tls is not None else True
            ),
        ) as session:
            while not self._stopping:
                self.output.append(f"[corral] starting: {' '.join(self.args)}")
                self.child = ChildProcess(
                    self.args,
                    name=self.name,
                    output=self.output,
                    log_path=self.log_path,
                    env=self.env,
                )
                self.launches += 1
                self._set("starting")
                await self.child.start()
                launched = time.monotonic()
                error = await self._until_ready(session)
                if error is None:
                    self.started_at = time.monotonic()
                    self.ready_since = time.time()
                    self.readies += 1
                    self.startup_seconds.append(self.started_at - launched)
                    self._set("ready", "")
                    code = await self.child.wait()
                    if self._stopping:
                        return
                    self.last_exit_code = code
                    error = f"exited with code {code}"
                    if time.monotonic() - launched > self.options.backoff_reset_after:
                        backoff = self.options.backoff_initial
                        streak = 0
                elif self.child.running():
                    await self.child.stop(self.options.stop_grace)
                if self._stopping:
                    return
                self.failed_runs += 1
                tail = "\n".join(self.child.tail(10))
                oom = None if self.readies else out_of_memory(self.child.tail(40))
                if oom is not None:
                    error = f"{error}: {oom.describe()}"
                message = f"{self.name} {error}; last log lines:\n{tail}"
                now = time.monotonic()
                self.failures.append(now)
                while self.failures and now - self.failures[0] > self.options.failure_window:
                    self.failures.popleft()
                streak += 1
                never_ready = self.readies == 0 and streak >= self.options.start_attempts
                self.out_of_memory = oom
                if len(self.failures) >= self.options.max_failures or never_ready or oom:
                    log.error("instance failed for good name=%s %s", self.name, message)
                    self._set("failed", message)
                    return
                delay = 0.0 if streak == 1 else backoff
                if streak > 1:
                    backoff = min(backoff * 2, self.options.backoff_max)
                log.error("instance down name=%s restart_in=%.1fs %s", self.name, delay, message)
                self._set("starting", message)
                if delay:
                    await asyncio.sleep(delay)
                self.restarts += 1

    async def _until_ready(self, session: aiohttp.ClientSession) -> str | None:
        """None once ``/health`` answers 200; else why the start failed."""
        assert self.child is not None
        deadline = time.monotonic() + self.options.startup_timeout
        while True:
            if not self.child.running():
                code = await self.child.wait()
                self.last_exit_code = code
                return f"exited with code {code} before it was ready"
            self._ready_hint.clear()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(self.health_url) as response:
                    if response.status == 200:
                        return None
            if time.monotonic() > deadline:
                return f"was not ready within {self.options.startup_timeout:g} s"
            # poll again after ready_poll, or at once when the server logs readiness
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready_hint.wait(), self.options.ready_poll)
