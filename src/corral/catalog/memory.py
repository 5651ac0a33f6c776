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

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
        total += int(model.kv_bytes_per_token * _kv_scale(args) * context_tokens(model, args))
    return total


def _kv_scale(args: Sequence[str]) -> float:
    """The KV cache's size against f16, for its ``-ctk``/``-ctv`` types."""
    k_type = (_flag(args, "-ctk", "--cache-type-k") or "f16").lower()
    v_type = (_flag(args, "-ctv", "--cache-type-v") or "f16").lower()
    return (CACHE_TYPE_BYTES.get(k_type, 2.0) + CACHE_TYPE_BYTES.get(v_type, 2.0)) / 4.0


#: What a device holds beyond the tensors corral counts: compute buffers, the driver's
#: context (a CUDA context alone is a few hundred MiB). It errs high, as the rest does.
DEVICE_OVERHEAD_BYTES = 512 * 1024 * 1024

#: Arguments that say which devices a server uses; given, corral places nothing itself.
DEVICE_FLAGS = ("-dev", "--device", "-ts", "--tensor-split", "-sm", "--split-mode", "-mg",
                "--main-gpu")  # fmt: skip


@dataclass(frozen=True)
class MemoryNeed:
    """What one server is expected to take: host RAM, and bytes on each device."""

    ram: int
    devices: Mapping[str, int] = field(default_factory=dict)

    def on(self, device: str) -> int:
        return self.devices.get(device, 0)


def gpu_layers(args: Sequence[str], n_layer: int) -> int:
    """Layers ``-ngl`` offloads, the output layer counting as one more (llama.cpp's
    count): absent, ``auto``, ``all`` or negative offload everything (llama-server's
    default since it fits models itself), a number is capped at ``n_layer + 1``."""
    raw = _flag(args, "-ngl", "--gpu-layers", "--n-gpu-layers")
    if raw is None or raw.strip().lower() in ("auto", "all"):
        return n_layer + 1
    try:
        value = int(raw)
    except ValueError:
        return n_layer + 1
    return n_layer + 1 if value < 0 else min(value, n_layer + 1)


def pinned_devices(args: Sequence[str]) -> tuple[str, ...] | None:
    """The devices ``--device`` names (``()`` for ``none``), or None when not given."""
    raw = _flag(args, "-dev", "--device")
    if raw is None:
        return None
    names = tuple(d.strip() for d in raw.split(",") if d.strip())
    return () if names in ((), ("none",)) else names


def split_shares(
    args: Sequence[str], devices: Sequence[str], free: Mapping[str, int] | None = None
) -> list[float]:
    """Each device's share of the offloaded layers: ``-sm none`` puts them all on the
    main GPU (``-mg``), ``--tensor-split`` gives proportions, otherwise llama.cpp
    splits in proportion to each device's free memory (equal when unknown)."""
    if not devices:
        return []
    if (_flag(args, "-sm", "--split-mode") or "layer").lower() == "none":
        try:
            main = int(_flag(args, "-mg", "--main-gpu") or 0)
        except ValueError:
            main = 0
        main = main if 0 <= main < len(devices) else 0
        return [1.0 if i == main else 0.0 for i in range(len(devices))]
    raw = _flag(args, "-ts", "--tensor-split")
    weights: list[float] = []
    if raw:
        try:
            weights = [float(x) for x in raw.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            weights = []
        weights = (weights + [0.0] * len(devices))[: len(devices)]
    if not weights or sum(weights) <= 0:
        known = [max(0, (free or {}).get(d, 0)) for d in devices]
        weights = [float(k) for k in known] if all(known) else [1.0] * len(devices)
    total = sum(weights)
    return [w / total for w in weights]


def estimate_memory(
    model: CatalogModel,
    args: Sequence[str],
    devices: Sequence[str] = (),
    free: Mapping[str, int] | None = None,
) -> MemoryNeed:
    """Where a llama-server serving ``model`` with ``args`` on ``devices`` takes memory.

    With no devices (a CPU build, ``--device none``, ``-ngl 0``) all of it is RAM, as
    :func:`estimate_bytes` says. Otherwise llama.cpp's layer split is followed: the last
    ``-ngl`` repeating layers are offloaded (and the output layer when ``-ngl`` exceeds
    them), spread over the devices by :func:`split_shares` the way llama.cpp assigns
    them (cumulative shares, layer by layer); each layer's KV cache lives with it
    (unless ``-nkvo``); the input embedding stays in RAM; a device that gets anything
    also gets :data:`DEVICE_OVERHEAD_BYTES`; a projector goes to the first device
    (unless ``--no-mmproj-offload``). A model whose header gives no layer layout is
    counted as RAM.
    """
    layout = model.weights
    if not devices or layout is None or not layout.layers:
        return MemoryNeed(ram=estimate_bytes(model, args))
    n_layer = len(layout.layers)
    offloaded = gpu_layers(args, n_layer)
    if offloaded <= 0:
        return MemoryNeed(ram=estimate_bytes(model, args))
    shares = split_shares(args, devices, free)
    bounds = list(itertools.accumulate(shares))
    first_gpu = max(n_layer - offloaded, 0)
    kv_layer = 0.0
    if model.kv_bytes_per_token:
        kv_layer = model.kv_bytes_per_token * _kv_scale(args) * context_tokens(model, args)
        kv_layer /= n_layer
    kv_on_gpu = not any(a in ("-nkvo", "--no-kv-offload") for a in args)
    on: dict[str, float] = {}
    ram = float(OVERHEAD_BYTES + layout.embedding)

    def device_of(il: int) -> str | None:
        if il < first_gpu or il - first_gpu >= offloaded:
            return None
        index = bisect.bisect_right(bounds, (il - first_gpu) / offloaded)
        return devices[min(index, len(devices) - 1)]

    for il, nbytes in enumerate(layout.layers):
        where = device_of(il)
        if where is None:
            ram += nbytes + kv_layer
        else:
            on[where] = on.get(where, 0.0) + nbytes + (kv_layer if kv_on_gpu else 0.0)
            ram += 0.0 if kv_on_gpu else kv_layer
    output = layout.output + (layout.embedding if layout.tied else 0)
    where = device_of(n_layer)
    if where is None:
        ram += layout.output
    else:
        on[where] = on.get(where, 0.0) + output
    if model.mmproj is not None:
        try:
            projector = model.mmproj.stat().st_size
        except OSError:
            projector = 0
        if "--no-mmproj-offload" in args:
            ram += projector
        else:
            on[devices[0]] = on.get(devices[0], 0.0) + projector
    used = {d: int(b + DEVICE_OVERHEAD_BYTES) for d, b in on.items() if b > 0}
    return MemoryNeed(ram=int(ram), devices=used)


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
