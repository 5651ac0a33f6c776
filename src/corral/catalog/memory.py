"""How much memory a llama-server will take, estimated before it starts.

The estimate is the model's files (weights are mapped and read in full), its
projector, and the KV cache: ``kv_bytes_per_token`` (from the GGUF attention shape, at
f16) times the context llama-server will allocate, scaled for a quantized cache type
(``-ctk``/``-ctv``), plus a fixed allowance for compute buffers. It errs high: an
admission check that refuses a model that would have fitted is an annoyance; one that
lets the machine swap is an outage.

The context is ``-c``/``--ctx-size`` from the arguments; absent or 0, llama-server
uses the model's training context (``context_length``), and so does this estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import psutil

from corral.catalog.model import CatalogModel

#: Compute buffers, the HTTP server and the rest of a llama-server beyond its tensors.
OVERHEAD_BYTES = 256 * 1024 * 1024

#: Context assumed when neither the arguments nor the model say.
DEFAULT_CONTEXT = 4096

#: Bytes per element of the KV cache by ``--cache-type-k/v`` (f16 is 2).
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "iq4_nl": 18 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}


def _flag(args: Sequence[str], *names: str) -> str | None:
    """The value of the last of ``names`` in ``args`` (``-c 4096`` or ``--ctx-size=4096``)."""
    found = None
    for index, arg in enumerate(args):
        name, sep, value = arg.partition("=")
        if name in names:
            if sep:
                found = value
            elif index + 1 < len(args):
                found = args[index + 1]
    return found


def context_tokens(model: CatalogModel, args: Sequence[str]) -> int:
    raw = _flag(args, "-c", "--ctx-size")
    try:
        ctx = int(raw) if raw is not None else 0
    except ValueError:
        ctx = 0
    return ctx if ctx > 0 else (model.context_length or DEFAULT_CONTEXT)


def estimate_bytes(model: CatalogModel, args: Sequence[str]) -> int:
    """Estimated resident bytes of a llama-server serving ``model`` with ``args``."""
    total = model.size_bytes + OVERHEAD_BYTES
    if model.mmproj is not None:
        try:
            total += model.mmproj.stat().st_size
        except OSError:
            pass
    if model.kv_bytes_per_token:
        k_type = (_flag(args, "-ctk", "--cache-type-k") or "f16").lower()
        v_type = (_flag(args, "-ctv", "--cache-type-v") or "f16").lower()
        scale = (CACHE_TYPE_BYTES.get(k_type, 2.0) + CACHE_TYPE_BYTES.get(v_type, 2.0)) / 4.0
        total += int(model.kv_bytes_per_token * scale * context_tokens(model, args))
    return total


def available_bytes() -> int:
    """Memory the system can give a new process without swapping (psutil)."""
    return int(psutil.virtual_memory().available)


def total_bytes() -> int:
    """This machine's memory in all: what no eviction can go beyond."""
    return int(psutil.virtual_memory().total)


def format_bytes(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return f"{value} B"
