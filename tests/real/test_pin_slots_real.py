"""``--pin-slots`` against the real llama-server: corral's pins are the slots it runs on.

``corral serve --policy prefix --pin-slots`` in front of one real llama-server with three
slots. Which slot served a request is read from llama-server itself (``/slots``: the slot
whose ``id_task`` changed), never from corral.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.serve_process import start_serve
from tests.support.waiting import wait_until

pytestmark = pytest.mark.real

READY_TIMEOUT_S = 60.0
TOKEN = "pin-test-token"


def _get(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return json.loads(r.read())


def _post(url: str, body: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read()), dict(response.headers)


@dataclass
class Pinned:
    base: str
    server: str  # the llama-server's own URL


@pytest.fixture(scope="module")
def pinned(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pinned]:
    corral = start_serve(
        tmp_path_factory.mktemp("pin-slots"),
        llama_server_bin,
        tiny_model,
        TOKEN,
        serve_args=["--policy", "prefix", "--pin-slots"],
        llama_args=["--parallel", "3", "--ctx-size", "3072"],
    )
    try:

        def usable() -> bool:
            try:
                fleet = _get(corral.management + "/api/v1/fleet", TOKEN)
                return bool(fleet["instances"] and fleet["instances"][0]["usable"])
            except (urllib.error.URLError, OSError, KeyError):
                return False

        wait_until(
            usable,
            "corral serve's instance to be usable",
            READY_TIMEOUT_S,
            watch=[(corral.process, corral.log_path)],
        )
        fleet = _get(corral.management + "/api/v1/fleet", TOKEN)
        yield Pinned(corral.base, str(fleet["instances"][0]["url"]).rstrip("/"))
    finally:
        corral.stop()


def _tasks(server: str) -> dict[int, int | None]:
    return {slot["id"]: slot.get("id_task") for slot in _get(server + "/slots")}


def _served_by(server: str, before: dict[int, int | None]) -> int:
    changed = [slot for slot, task in _tasks(server).items() if task != before.get(slot)]
    assert len(changed) == 1, (before, _tasks(server))
    return changed[0]


def test_chat_turns_run_on_the_slot_corral_pinned_and_find_their_cache(pinned: Pinned) -> None:
    # someone else's prompt, straight to the server (it lands on slot 2): left to
    # itself, the server puts the next new prompts on its least recently used slots in
    # its own order; corral, which did not see that request, pins them to 0 and then 1
    _post(pinned.server + "/completion", {"prompt": "zz " * 40, "n_predict": 1})
    client = OpenAI(base_url=pinned.base + "/v1", api_key="unused", max_retries=0)
    history: dict[str, list[dict[str, str]]] = {
        topic: [{"role": "system", "content": f"You know {topic}. " + f"{topic} " * 60}]
        for topic in ("tea", "jazz")
    }
    seen: dict[str, set[int]] = {topic: set() for topic in history}
    cached: dict[str, list[int]] = {topic: [] for topic in history}
    for turn in range(3):
        for topic, messages in history.items():
            messages.append({"role": "user", "content": f"Tell me more about {topic} {turn}."})
            before = _tasks(pinned.server)
            raw = client.chat.completions.with_raw_response.create(
                model="tiny",
                messages=messages,
                max_tokens=4,  # type: ignore[arg-type]
            )
            response = raw.parse()
            slot = int(raw.headers["X-Corral-Slot"])
            assert _served_by(pinned.server, before) == slot  # the pin was honoured
            seen[topic].add(slot)
            details = response.usage.prompt_tokens_details if response.usage else None
            cached[topic].append((details.cached_tokens or 0) if details else 0)
            answer = response.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": answer})
    assert seen["tea"] == {0} and seen["jazz"] == {1}, seen
    assert all(n > 0 for topic in cached for n in cached[topic][1:]), cached


def test_completion_reports_the_pinned_slot(pinned: Pinned) -> None:
    data, headers = _post(
        pinned.base + "/completion", {"model": "tiny", "prompt": "pin me " * 20, "n_predict": 2}
    )
    assert str(data["id_slot"]) == headers["X-Corral-Slot"]
