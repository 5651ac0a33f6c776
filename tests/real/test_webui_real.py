"""llama-server's web UI through ``corral serve``, in headless Chromium.

corral serves two tiny models loaded on demand; the page comes from a llama-server
through corral's passthrough (corral's llama-server build has no UI compiled in: the
supervisor hands every llama-server the UI that ``corral llama-server install`` built
beside the binary, as ``--path``), the UI finds router mode in corral's ``/props``, lists
corral's models in its selector and streams a chat reply from the model picked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from corral.catalog.tiny import make_tiny_model
from corral.supervisor.binary import InstallError, cached_binary, install_ui, ui_beside
from tests.support.net import free_port
from tests.support.serve_process import READY_TIMEOUT_S
from tests.support.waiting import wait_until

pytestmark = pytest.mark.real

TOKEN = "real-webui-token"
UI_TIMEOUT_MS = 60_000


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def built_ui(llama_server_bin: Path) -> Path:
    """The web UI beside the llama-server binary, built the way `corral llama-server
    install` builds it (npm, about two minutes on two cores, once)."""
    ui = ui_beside(llama_server_bin)
    if ui is not None:
        return ui
    if llama_server_bin != cached_binary():
        pytest.fail(
            f"{llama_server_bin} has no web UI beside it ({llama_server_bin.parent}/ui): "
            "use corral's build (`corral llama-server install`)"
        )
    try:
        return install_ui()
    except InstallError as exc:
        pytest.fail(f"the web UI test needs llama-server's web UI: {exc}")


@pytest.fixture(scope="module")
def corral_two_models(
    llama_server_bin: Path, built_ui: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("webui-real")
    folder = tmp / "models"
    make_tiny_model(folder / "alpha.gguf", seed=1, name="alpha")
    make_tiny_model(folder / "beta.gguf", seed=2, name="beta")
    config = tmp / "corral.yaml"
    # -n: the tiny model's noise would otherwise run to the end of the context
    config.write_text('llama_args: ["--parallel", "2", "--ctx-size", "2048", "-n", "24"]\n')
    inference, management = free_port(), free_port()
    log_path = tmp / "corral.log"
    # corral passes the built UI as --path itself unless the user chose a static path
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_ARG_STATIC_PATH"}
    env |= {"CORRAL_MANAGEMENT_TOKEN": TOKEN, "CORRAL_STATE_DIR": str(tmp)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "corral.cli", "serve", "--config", str(config),
                "--models-dir", str(folder),
                "--llama-server", str(llama_server_bin),
                "--inference-addr", f"127.0.0.1:{inference}",
                "--management-addr", f"127.0.0.1:{management}",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{inference}"
    try:
        wait_until(
            lambda: _answers(base + "/v1/models"),
            "corral serve to answer",
            READY_TIMEOUT_S,
            watch=[(process, log_path)],
        )
        yield base
    finally:
        process.terminate()
        process.wait(30)


async def test_webui_lists_corrals_models_and_streams_a_reply_from_the_one_picked(
    corral_two_models: str, browser: Browser, output_dir: Path
) -> None:
    page = await browser.new_page()
    chats: list[str] = []
    page.on(
        "request",
        lambda r: chats.append(r.post_data or "") if r.url.endswith("/chat/completions") else None,
    )
    await page.goto(corral_two_models + "/", timeout=UI_TIMEOUT_MS)
    message_box = page.get_by_role("textbox", name="Type a message...")
    await expect(message_box).to_be_visible(timeout=UI_TIMEOUT_MS)

    # router mode: a model selector button naming one of corral's models
    selector = page.get_by_role("button", name="alpha", exact=True)
    await expect(selector).to_be_visible(timeout=UI_TIMEOUT_MS)
    await selector.click()
    options = page.get_by_role("option")
    await expect(options.filter(has_text="alpha")).to_have_count(1, timeout=UI_TIMEOUT_MS)
    await expect(options.filter(has_text="beta")).to_have_count(1)
    await expect(options).to_have_count(2)
    await options.filter(has_text="beta").get_by_role("button", name="beta").click()
    if await page.get_by_role("menu").count():
        await page.keyboard.press("Escape")  # the menu may stay open after a pick
    await expect(page.get_by_role("menu")).to_have_count(0)
    await expect(page.get_by_role("button", name="beta", exact=True)).to_be_visible(
        timeout=UI_TIMEOUT_MS
    )

    await message_box.fill("hello from the web UI")
    await message_box.press("Enter")
    reply = page.get_by_role("group", name="Assistant message with actions")
    await expect(reply).to_be_visible(timeout=UI_TIMEOUT_MS)
    # the reply is done when its actions (and the model that wrote it) show up
    await expect(reply.get_by_role("button", name="Regenerate")).to_be_visible(
        timeout=UI_TIMEOUT_MS
    )
    # the text may render a moment after the actions show (a short reply's markdown
    # block settles last): wait for it rather than read it once
    await expect(reply.get_by_role("paragraph").first).to_have_text(
        re.compile(r"\S"), timeout=UI_TIMEOUT_MS
    )
    await expect(reply.get_by_role("button", name="beta", exact=True)).to_be_visible()
    assert any('"model":"beta"' in body for body in chats), chats
    await page.screenshot(path=str(output_dir / "webui.png"), full_page=True)
