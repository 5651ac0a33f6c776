"""Fixtures shared by every tier.

The real tier needs the ``llama-server`` binary. It is found the way corral finds it
(``LLAMA_SERVER``, the build cache, ``PATH``); when it is missing the test *fails* with
the install command rather than skipping, so CI can never pass quietly without it.

The browser tests (the dashboard's, and the real tier's web UI test) use Playwright
driving Debian's Chromium, headless. ``scripts/bootstrap`` installs the ``chromium``
package; set ``CORRAL_CHROMIUM`` to use another binary. Screenshots go to
``test-output/`` (``CORRAL_TEST_OUTPUT``) so they are kept with the test run's output.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from corral.catalog.tiny import make_tiny_model
from corral.supervisor.binary import LlamaServerNotFound, find_llama_server


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server binary (fails loudly when it is not installed)."""
    try:
        return find_llama_server().path
    except LlamaServerNotFound as exc:
        pytest.fail(f"the real tier needs llama-server: {exc}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF with the default size, written once per run."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


ROOT = Path(__file__).resolve().parents[1]

# No background traffic: this machine's network is closed, and a test should not
# depend on what Chromium would like to fetch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CORRAL_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail(
            "the browser tests need Debian's chromium: run scripts/bootstrap (it installs "
            "it) or set CORRAL_CHROMIUM to a Chromium binary"
        )
    return path


@pytest.fixture
def output_dir() -> Path:
    path = Path(os.environ.get("CORRAL_TEST_OUTPUT") or ROOT / "test-output")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(),
            args=CHROMIUM_ARGS,  # headless, in a fresh profile of Playwright's
        )
        try:
            yield browser
        finally:
            await browser.close()
