"""The dashboard over the real llama-server: ``corral serve`` on the tiny model, run as
a user runs it, watched in headless Chromium while the official ``openai`` client
sends it requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai import AsyncOpenAI
from playwright.async_api import Browser, expect

from tests.support.serve_process import TOKEN, Corral
from tests.support.serve_process import corral as corral  # the fixture: corral serve, real

pytestmark = pytest.mark.real

TIMEOUT_MS = 30_000
READY_TIMEOUT_S = 90.0


async def test_dashboard_shows_the_real_server_its_traffic_and_its_log(
    corral: Corral, browser: Browser, output_dir: Path
) -> None:
    base, management = corral.base, corral.management
    page = await browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)

    async def page_loads() -> bool:
        try:
            response = await page.goto(f"{management}/dashboard#token={TOKEN}")
        except Exception:  # corral still starting: connection refused
            return False
        return response is not None and response.ok

    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    while not await page_loads():  # corral serve starts its llama-server first
        assert asyncio.get_running_loop().time() < deadline, "corral's dashboard never answered"
        await asyncio.sleep(0.2)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "ok")
    row = page.locator('#instances tbody tr[data-model="tiny"]')
    await expect(row.locator(".pill")).to_have_text("ready")
    await expect(row.locator(".slots")).to_contain_text("0/4")

    client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
            for _ in range(3)
        )
    )
    assert all(r.usage is not None and r.usage.completion_tokens == 4 for r in replies)
    models = page.locator('#models tbody tr[data-model="tiny"]')
    await expect(models.locator("td").nth(5)).to_have_text("3")  # requests
    await expect(models.locator("td").nth(6)).to_have_text("0")  # errors

    await row.get_by_role("button", name="Details").click()
    # the real llama-server's own start-up lines, through the agent's log tail
    await expect(page.locator("#log")).to_contain_text("model loaded")
    await page.screenshot(path=str(output_dir / "dashboard-real.png"), full_page=True)
    await page.close()
