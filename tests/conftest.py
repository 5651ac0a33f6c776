"""Fixtures shared by every tier.

The real tier needs the ``llama-server`` binary. It is found the way corral finds it
(``LLAMA_SERVER``, the build cache, ``PATH``); when it is missing the test *fails* with
the install command rather than skipping, so CI can never pass quietly without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
