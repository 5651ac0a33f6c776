"""``corral status`` against a running balancer prints what its management API holds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.fleet import MANAGEMENT_TOKEN, Fleet, start_fleet


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet()
    try:
        yield fleet
    finally:
        await fleet.close()


async def status(
    fleet: Fleet, *args: str, token: str | None = MANAGEMENT_TOKEN, command: str = "status"
) -> tuple[int, str, str]:
    env = {**os.environ, "CORRAL_STATE_DIR": "/nonexistent-corral-state"}
    env.pop("CORRAL_MANAGEMENT_TOKEN", None)
    if token is not None:
        env["CORRAL_MANAGEMENT_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", command,
        "--management-addr", fleet.balancer.addresses.management, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_prints_instances_slots_and_buffers(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=3)
    await fleet.add_fake(model="beta", slots=1)
    code, out, err = await status(fleet)
    assert code == 0, err
    assert "alpha" in out and "beta" in out
    assert "0/3" in out and "0/1" in out
    assert "agents: 2" in out
    assert "buffered requests: none" in out


async def test_status_json_is_the_management_api_fleet(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=2)
    code, out, _ = await status(fleet, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["models"] == ["alpha"]
    assert data["instances"][0]["slots_total"] == 2


async def test_status_with_a_wrong_token_says_so(fleet: Fleet) -> None:
    code, _, err = await status(fleet, token="wrong")
    assert code == 1
    assert "401" in err and "management token" in err


async def test_status_without_a_token_explains_where_to_get_one(fleet: Fleet) -> None:
    code, _, err = await status(fleet, token=None)
    assert code == 2
    assert "CORRAL_MANAGEMENT_TOKEN" in err


async def test_status_against_nothing_says_it_cannot_reach_it(tmp_path: Path) -> None:
    env = {**os.environ, "CORRAL_MANAGEMENT_TOKEN": "x"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "status", "--management-addr", "127.0.0.1:9",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 1
    assert b"cannot reach" in err


async def test_top_redraws_the_status_tables_and_stops_after_its_iterations(
    fleet: Fleet,
) -> None:
    await fleet.add_fake(model="alpha", slots=3)
    await fleet.add_fake(model="beta", slots=1)
    code, out, err = await status(fleet, "--iterations", "3", "--interval", "0.05", command="top")
    assert code == 0, err
    assert "alpha" in out and "beta" in out
    assert "0/3" in out and "0/1" in out
    assert "agents: 2" in out


async def test_top_shows_changes_as_they_happen_and_stops_on_ctrl_c(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=3)
    env = {**os.environ, "CORRAL_MANAGEMENT_TOKEN": MANAGEMENT_TOKEN}
    env.update(TTY_COMPATIBLE="1", TERM="xterm")  # draw each refresh, as on a terminal
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "top", "--interval", "0.05",
        "--management-addr", fleet.balancer.addresses.management,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(20):
            while b"alpha" not in seen:
                seen += await process.stdout.read(4096)
            await fleet.add_fake(model="beta", slots=1)  # appears at a later refresh
            while b"beta" not in seen:
                seen += await process.stdout.read(4096)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err


async def test_top_with_a_wrong_token_says_so_and_stops(fleet: Fleet) -> None:
    code, _, err = await status(fleet, "--iterations", "1", token="wrong", command="top")
    assert code == 1
    assert "401" in err and "management token" in err


def test_top_help_documents_the_refresh_options(capsys: pytest.CaptureFixture[str]) -> None:
    from corral.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["top", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--interval" in text and "stop after N refreshes" in text
