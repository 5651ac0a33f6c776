"""The dashboard in a real browser: headless Chromium driven by Playwright against a
real ``corral serve`` (balancer, model host, agents) whose llama-servers are the fake
binary, so loads, unloads and restarts start and stop real processes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from corral.serve import LocalServe
from tests.support.local_serve import AUTH, TOKEN, chat, pid_of, serving, settled
from tests.support.waiting import wait_for

TIMEOUT_MS = 15_000


@asynccontextmanager
async def dashboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, browser: Browser, **settings: Any
) -> AsyncIterator[tuple[LocalServe, str, aiohttp.ClientSession, Page, str]]:
    models = {"alpha": {"args": ["--parallel", "2"]}, "beta": {}}
    async with serving(tmp_path, monkeypatch, models, **settings) as (local, base, http):
        management = f"http://{local.balancer.addresses.management}"
        page = await browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            yield local, base, http, page, management
        finally:
            await page.close()


def instance_rows(page: Page, model: str) -> Any:
    return page.locator(f'#instances tbody tr[data-model="{model}"]')


async def test_sign_in_with_the_form_and_a_wrong_token_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, browser: Browser
) -> None:
    async with dashboard(tmp_path, monkeypatch, browser) as (_, _, _, page, management):
        await page.goto(management + "/dashboard")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#board")).to_be_hidden()
        await page.fill("#token", "not-the-token")
        await page.click("#login-form button[type=submit]")
        await expect(page.locator("#login-error")).to_contain_text("refused")
        await expect(page.locator("#board")).to_be_hidden()

        await page.fill("#token", TOKEN)
        await page.click("#login-form button[type=submit]")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ok")
        await expect(page.locator('#catalog tbody tr[data-catalog="alpha"]')).to_be_visible()
        # the token stays in this tab only, never in the address bar
        assert "token" not in page.url
        await page.click("#logout")
        await expect(page.locator("#login")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0


async def test_instances_appear_and_leave_live_and_the_buttons_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    browser: Browser,
    output_dir: Path,
) -> None:
    async with dashboard(tmp_path, monkeypatch, browser) as (local, base, http, page, management):
        assert local.host is not None
        await page.goto(f"{management}/dashboard#token={TOKEN}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ok")
        assert "token" not in page.url  # taken from the fragment and removed at once
        await page.evaluate("window.__sameDocument = true")  # a reload would lose this
        await expect(page.locator("#instances-empty")).to_be_visible()
        alpha = page.locator('#catalog tbody tr[data-catalog="alpha"]')
        await expect(alpha.locator(".pill")).to_have_text("unloaded")

        # an instance appears, started by a request from outside the page
        async with http.post(base + "/v1/chat/completions", json=chat("alpha")) as response:
            assert response.status == 200
        row = instance_rows(page, "alpha")
        await expect(row).to_have_count(1)
        await expect(row.locator(".pill")).to_have_text("ready")
        await expect(row.locator(".slots")).to_contain_text("0/2")
        await expect(alpha.locator(".pill")).to_have_text("loaded")
        await expect(alpha.locator(".host")).to_have_text("local")  # where it runs
        await expect(alpha.locator(".host")).to_have_attribute("title", "can start it: local")
        machine = page.locator('#hosts tbody tr[data-host="local"]')  # this machine's room
        await expect(machine.locator(".running")).to_have_text("alpha (loaded)")
        await expect(machine.locator(".servers")).to_contain_text("1/")
        for _ in range(4):
            async with http.post(base + "/v1/chat/completions", json=chat("alpha")) as response:
                assert response.status == 200
        traffic = page.locator('#models tbody tr[data-model="alpha"]')
        await expect(traffic.locator("td").nth(5)).to_have_text("5")  # requests
        await expect(traffic.locator("svg.spark rect")).not_to_have_count(0)

        # the Unload button drains and stops it: the row leaves, the process is gone
        await alpha.get_by_role("button", name="Unload").click()
        await expect(row).to_have_count(0)
        await expect(alpha.locator(".pill")).to_have_text("unloaded")
        assert "alpha" not in await settled(local)

        # the Load button starts beta
        beta = page.locator('#catalog tbody tr[data-catalog="beta"]')
        await beta.get_by_role("button", name="Load").click()
        beta_row = instance_rows(page, "beta")
        await expect(beta_row.locator(".pill")).to_have_text("ready")
        assert (await settled(local)).get("beta") == "loaded"

        # Details: the log tail and a restart, which gives a new process
        await beta_row.get_by_role("button", name="Details").click()
        await expect(page.locator("#detail")).to_be_visible()
        await expect(page.locator("#log")).to_contain_text(re.compile(r"\S"))
        first_pid = pid_of(local, "beta")
        await page.click("#restart")
        await expect(page.locator("#toasts")).to_contain_text("Restarting")
        await wait_for(
            lambda: pid_of(local, "beta") not in (None, first_pid), "beta to run a new process"
        )
        await expect(beta_row.locator("td").nth(6)).to_have_text("1")  # restarts
        await expect(beta_row.locator("td").nth(7)).to_have_text("cpu")  # its devices
        await expect(beta_row.locator(".pill")).to_have_text("ready")

        # a refused reconfiguration shows the server's reason
        await page.fill("#reconfigure-args", "--model /etc/passwd")
        await page.click("#reconfigure button[type=submit]")
        await expect(page.locator("#toasts .toast.bad")).to_contain_text("--model")

        await page.screenshot(path=str(output_dir / "dashboard.png"), full_page=True)
        assert await page.evaluate("window.__sameDocument === true")

        # and an instance leaving from outside the page shows too
        async with http.post(management + "/api/v1/models/beta/unload", headers=AUTH) as response:
            assert response.status == 200
        await expect(beta_row).to_have_count(0)
        await expect(page.locator("#detail-gone")).to_be_visible()
