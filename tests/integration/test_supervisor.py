"""The supervisor runs real processes: the fake llama-server, or programs that fail."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psutil
import pytest

from corral.supervisor.instance import SupervisedInstance, SupervisorOptions
from tests.support.net import free_port
from tests.support.waiting import wait_for

FAST = SupervisorOptions(
    startup_timeout=10.0,
    backoff_initial=0.05,
    backoff_max=0.2,
    max_failures=3,
    failure_window=60.0,
    stop_grace=1.0,
)


def fake_args(port: int, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "corral.testing.fake_llama_server", "--port", str(port), *flags,
    ]  # fmt: skip


def supervised(
    args: list[str], port: int, options: SupervisorOptions = FAST
) -> tuple[SupervisedInstance, list[str]]:
    states: list[str] = []
    instance = SupervisedInstance(
        args,
        f"http://127.0.0.1:{port}/health",
        name="test",
        options=options,
        on_change=lambda sup: states.append(sup.state),
    )
    return instance, states


async def kill_and_await_restart(instance: SupervisedInstance) -> None:
    """SIGKILL the ready server and wait until another process of it is ready."""
    assert await asyncio.wait_for(instance.wait_ready(), 15)
    assert instance.child is not None and instance.child.pid is not None
    first_pid = instance.child.pid
    psutil.Process(first_pid).kill()
    await wait_for(
        lambda: instance.state == "ready" and instance.child is not None
        and instance.child.pid != first_pid,
        "a restarted, ready server",
    )  # fmt: skip


async def test_instance_is_ready_only_once_health_answers_200() -> None:
    port = free_port()
    instance, states = supervised(fake_args(port, "--load-delay", "0.5"), port)
    instance.start()
    try:
        assert await asyncio.wait_for(instance.wait_ready(), 15)
        assert states[:2] == ["starting", "ready"]
    finally:
        await instance.stop()
    assert instance.state == "stopped"


async def test_a_server_that_never_starts_is_tried_start_attempts_times_then_failed() -> None:
    crash = [sys.executable, "-c", "import sys; print('model file is corrupt'); sys.exit(3)"]
    instance, states = supervised(crash, free_port())
    instance.start()
    assert not await asyncio.wait_for(instance.wait_ready(), 15)
    assert instance.state == "failed"
    assert instance.last_exit_code == 3
    assert "exited with code 3 before it was ready" in instance.last_error
    assert "model file is corrupt" in instance.last_error
    assert instance.launches == FAST.start_attempts < FAST.max_failures
    assert instance.restarts == FAST.start_attempts - 1
    assert states[-1] == "failed"
    await instance.stop()


async def test_a_server_that_was_ready_is_restarted_until_max_failures(tmp_path: Path) -> None:
    """Crashes after a ready run count towards max_failures, not start_attempts."""
    port = free_port()
    marker = tmp_path / "ran"
    # ready on the first run only; every later run crashes before it is ready
    script = (
        "import os, sys, runpy\n"
        f"marker = {str(marker)!r}\n"
        "if os.path.exists(marker):\n"
        "    print('crash after a ready run'); sys.exit(4)\n"
        "open(marker, 'w').close()\n"
        f"sys.argv = ['fake', '--port', '{port}']\n"
        "runpy.run_module('corral.testing.fake_llama_server', run_name='__main__')\n"
    )
    instance, _ = supervised([sys.executable, "-c", script], port)
    instance.start()
    try:
        assert await asyncio.wait_for(instance.wait_ready(), 15)
        assert instance.child is not None and instance.child.pid is not None
        psutil.Process(instance.child.pid).kill()
        await wait_for(lambda: instance.state == "failed", "the supervisor to give up")
        assert instance.launches == FAST.max_failures
        assert "crash after a ready run" in instance.last_error
    finally:
        await instance.stop()


async def test_the_first_crash_restarts_at_once_then_the_backoff_applies() -> None:
    port = free_port()
    slow = SupervisorOptions(
        startup_timeout=10.0, backoff_initial=30.0, max_failures=5, stop_grace=1.0
    )
    instance, _ = supervised(fake_args(port), port, slow)
    instance.start()
    try:
        # with a 30 s backoff, only an immediate restart is ready within the wait
        await kill_and_await_restart(instance)
        assert instance.child is not None
        second_pid = instance.child.pid
        assert second_pid is not None
        psutil.Process(second_pid).kill()
        await wait_for(lambda: instance.state == "starting", "the second crash noticed")
        # an immediate restart would have launched a new child before the state read
        # "starting" again; with the backoff the crashed one is still the last child
        assert instance.child.pid == second_pid, "the second crash waits for the backoff"
        assert "exited with code -9" in instance.last_error
        assert instance.restarts == 1
    finally:
        await instance.stop()


async def test_a_server_that_never_gets_ready_times_out_and_is_killed() -> None:
    port = free_port()
    options = SupervisorOptions(startup_timeout=0.5, max_failures=1, stop_grace=1.0)
    instance, _ = supervised(fake_args(port, "--load-delay", "60"), port, options)
    instance.start()
    assert not await asyncio.wait_for(instance.wait_ready(), 15)
    assert "was not ready within 0.5 s" in instance.last_error
    assert instance.child is not None and not instance.child.running()


async def test_an_unexpected_exit_restarts_the_server() -> None:
    port = free_port()
    instance, states = supervised(fake_args(port), port)
    instance.start()
    try:
        await kill_and_await_restart(instance)
        assert instance.restarts == 1
        assert instance.last_exit_code == -9
        assert states == ["starting", "ready", "starting", "ready"]
    finally:
        await instance.stop()


async def test_manual_restart_clears_failed() -> None:
    port = free_port()
    marker = [sys.executable, "-c", "import sys; sys.exit(1)"]
    instance, _ = supervised(marker, port)
    instance.start()
    assert not await asyncio.wait_for(instance.wait_ready(), 15)
    assert instance.state == "failed"
    instance.args = fake_args(port)  # e.g. the operator fixed the model path
    await instance.restart()
    try:
        assert await asyncio.wait_for(instance.wait_ready(), 15)
    finally:
        await instance.stop()


async def test_stop_kills_a_server_that_ignores_sigterm() -> None:
    port = free_port()
    instance, _ = supervised(fake_args(port, "--fault", "ignore-sigterm"), port)
    instance.start()
    assert await asyncio.wait_for(instance.wait_ready(), 15)
    assert instance.child is not None and instance.child.pid is not None
    pid = instance.child.pid
    await asyncio.wait_for(instance.stop(), 15)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert instance.last_exit_code == -9


async def test_a_readiness_line_in_the_log_triggers_a_health_check_at_once() -> None:
    port = free_port()
    slow_polls = SupervisorOptions(startup_timeout=60.0, ready_poll=30.0, stop_grace=1.0)
    instance, _ = supervised(fake_args(port), port, slow_polls)
    instance.start()
    try:
        # the first /health poll comes before the server listens; without the hint
        # from its "listening on" line the next one would be 30 s later
        assert await asyncio.wait_for(instance.wait_ready(), 15)
    finally:
        await instance.stop()


@pytest.mark.parametrize("use_setpriv", [True, False])
async def test_a_child_dies_with_its_corral_even_on_sigkill(use_setpriv: bool) -> None:
    """Both ways of setting the parent-death signal: setpriv, and the preexec fallback."""
    script = (
        "import asyncio, sys\n"
        "from corral.supervisor import process\n"
        f"if not {use_setpriv}: process._SETPRIV = None\n"
        "async def main():\n"
        "    child = process.ChildProcess(['sleep', '60'])\n"
        "    await child.start()\n"
        "    print(child.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    child_pid = int(await asyncio.wait_for(parent.stdout.readline(), 15))
    child = psutil.Process(child_pid)
    # same pid throughout: setpriv execs into the program a moment after the spawn
    await wait_for(lambda: child.name() == "sleep", "the child to exec into sleep")
    parent.kill()
    await parent.wait()
    _, alive = psutil.wait_procs([child], timeout=10)
    assert alive == [], "the child outlived its parent"
