"""corral's memory estimate against what the real llama-server allocates.

llama-server at log verbosity 4 prints the buffers it allocates; on the CPU build the
model's tensors are one ``CPU_Mapped model buffer`` and the KV cache one ``CPU KV
buffer``. Those must be what corral computes from the GGUF header (every tensor's bytes,
and the KV cache for the context), to llama.cpp's two decimals of MiB. The same figures
split by layer are what the GPU estimate puts on a device (``scripts/check-vulkan``
compares them on a Vulkan device).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest

from corral.catalog.discovery import manual_model
from corral.catalog.memory import DEVICE_OVERHEAD_BYTES, estimate_memory
from corral.catalog.tiny import make_tiny_model
from corral.config import ModelConfig
from tests.support.net import free_port

pytestmark = pytest.mark.real

MIB = 2**20
BUFFER = re.compile(r"(?P<what>CPU_Mapped model|CPU KV) buffer size =\s+(?P<mib>[\d.]+) MiB")


def allocated(binary: Path, model: Path, *args: str) -> dict[str, float]:
    """The buffers llama-server reports while it loads ``model`` (MiB by kind)."""
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *args]
    found: dict[str, float] = {}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        try:
            for line in process.stdout:
                match = BUFFER.search(line)
                if match is not None:
                    found[match["what"]] = float(match["mib"])
                if "model loaded" in line or len(found) == 2 or time.monotonic() > deadline:
                    break
        finally:
            process.kill()
    return found


async def test_the_weights_and_kv_cache_are_what_llama_server_allocates(
    llama_server_bin: Path, tmp_path: Path
) -> None:
    # GQA (2 KV heads of 8), f16 weights, 4 layers: every part of the estimate counts
    path = make_tiny_model(
        tmp_path / "gqa.gguf", n_layer=4, n_embd=128, n_head=8, n_head_kv=2, n_ff=384,
        dtype="f16",
    )  # fmt: skip
    model, problem = manual_model("gqa", ModelConfig(path=path))
    assert problem is None and model.weights is not None and model.kv_bytes_per_token
    buffers = await asyncio.to_thread(allocated, llama_server_bin, path, "-c", "2048", "-np", "1")
    assert set(buffers) == {"CPU_Mapped model", "CPU KV"}, buffers
    assert buffers["CPU_Mapped model"] == pytest.approx(model.weights.total / MIB, abs=0.006)
    assert buffers["CPU KV"] == pytest.approx(model.kv_bytes_per_token * 2048 / MIB, abs=0.006)
    # and the per-device figures add up to the same tensors (here split over a
    # made-up device: layers, output and KV there; the embedding in RAM)
    need = estimate_memory(model, ["-c", "2048"], ["GPU0"])
    on_device = need.on("GPU0") - DEVICE_OVERHEAD_BYTES
    assert (
        on_device + model.weights.embedding == model.weights.total + model.kv_bytes_per_token * 2048
    )
