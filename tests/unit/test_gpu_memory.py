"""GPU memory: what a model puts on each device, where a load goes on a host with
several GPUs, and a failed allocation read from llama-server's log.

The figures are worked out by hand from the tiny models' shapes (see the comments), not
from the code under test.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from corral.catalog.discovery import manual_model
from corral.catalog.memory import (
    DEVICE_OVERHEAD_BYTES,
    OVERHEAD_BYTES,
    estimate_bytes,
    estimate_memory,
    gpu_layers,
    split_shares,
)
from corral.catalog.model import CatalogModel
from corral.catalog.tiny import make_tiny_model
from corral.config import ModelConfig
from corral.hosting import ModelState
from corral.supervisor import devices
from corral.supervisor.devices import nvml_memory, out_of_memory
from corral.supervisor.planner import (
    Evict,
    Limits,
    Load,
    Placement,
    Refuse,
    Resident,
    Start,
    Wait,
    place,
    plan_room,
)

MIB = 2**20

# Model A: make_tiny_model defaults, f32. n_vocab = 5 control + 256 byte + 400 words = 661.
#   a layer: 2 norms 64*4 + attn_q/attn_output 2*64*64*4 + attn_k/attn_v 2*64*64*4
#            + ffn_gate/up/down 3*256*64*4 = 512 + 32768 + 32768 + 196608 = 262656
#   token_embd 661*64*4 = 169216; output 661*64*4 + output_norm 64*4 = 169472
#   KV per token (f16): 2 layers * 4 kv heads * (16 + 16) * 2 bytes = 512
A_LAYER, A_EMBD, A_OUT, A_KV = 262656, 169216, 169472, 512
# Model B: 4 layers, n_embd 128, 8 heads, 2 KV heads (GQA, head 16), n_ff 384, f16
#   a layer: 2 norms 128*4 (f32) + q/out 2*128*128*2 + k/v 2*32*128*2 + 3*384*128*2
#            = 1024 + 65536 + 16384 + 294912 = 377856
#   token_embd 661*128*2 = 169216; output 169216 + norm 128*4 = 169728
#   KV per token: 4 layers * 2 kv heads * (16 + 16) * 2 bytes = 512
B_LAYER, B_EMBD, B_OUT, B_KV = 377856, 169216, 169728, 512


def model(tmp_path: Path, name: str, **shape: Any) -> CatalogModel:
    path = make_tiny_model(tmp_path / f"{name}.gguf", **shape)
    found, problem = manual_model(name, ModelConfig(path=path))
    assert problem is None
    return found


@pytest.fixture
def a(tmp_path: Path) -> CatalogModel:
    return model(tmp_path, "a")


@pytest.fixture
def b(tmp_path: Path) -> CatalogModel:
    return model(tmp_path, "b", n_layer=4, n_embd=128, n_head=8, n_head_kv=2, n_ff=384, dtype="f16")


def test_the_header_gives_each_layers_bytes(a: CatalogModel, b: CatalogModel) -> None:
    assert a.weights is not None and b.weights is not None
    assert a.weights.layers == (A_LAYER, A_LAYER)
    assert (a.weights.embedding, a.weights.output, a.weights.tied) == (A_EMBD, A_OUT, False)
    assert b.weights.layers == (B_LAYER,) * 4
    assert (b.weights.embedding, b.weights.output) == (B_EMBD, B_OUT)
    assert (a.kv_bytes_per_token, b.kv_bytes_per_token) == (A_KV, B_KV)
    # every tensor byte is in the layout: the file is the layout plus its header
    assert 0 < a.size_bytes - a.weights.total < 64 * 1024


def test_full_offload_puts_layers_output_and_kv_on_the_device(a: CatalogModel) -> None:
    need = estimate_memory(a, ["-c", "1024"], ["CUDA0"])
    kv = A_KV * 1024
    assert need.devices == {"CUDA0": 2 * A_LAYER + A_OUT + kv + DEVICE_OVERHEAD_BYTES}
    assert need.ram == OVERHEAD_BYTES + A_EMBD  # the input embedding stays on the CPU
    # -nkvo keeps the KV cache in RAM
    need = estimate_memory(a, ["-c", "1024", "-nkvo"], ["CUDA0"])
    assert need.on("CUDA0") == 2 * A_LAYER + A_OUT + DEVICE_OVERHEAD_BYTES
    assert need.ram == OVERHEAD_BYTES + A_EMBD + kv
    # a quantized cache: q8_0 is 34/32 bytes an element against f16's 2
    need = estimate_memory(a, ["-c", "1024", "-ctk", "q8_0", "-ctv", "q8_0"], ["CUDA0"])
    assert need.on("CUDA0") == int(2 * A_LAYER + A_OUT + kv * (34 / 32) / 2) + DEVICE_OVERHEAD_BYTES


def test_partial_offload_takes_the_last_layers_and_keeps_the_output_on_the_cpu(
    b: CatalogModel,
) -> None:
    kv_layer = B_KV * 2048 // 4  # -c 2048, a quarter per layer
    need = estimate_memory(b, ["-c", "2048", "-ngl", "2"], ["CUDA0"])
    assert need.devices == {"CUDA0": 2 * (B_LAYER + kv_layer) + DEVICE_OVERHEAD_BYTES}
    assert need.ram == OVERHEAD_BYTES + B_EMBD + 2 * (B_LAYER + kv_layer) + B_OUT
    # -ngl 5 (all 4 layers and the output) is everything; more is the same
    full = estimate_memory(b, ["-c", "2048", "-ngl", "99"], ["CUDA0"])
    assert full.devices == {"CUDA0": 4 * (B_LAYER + kv_layer) + B_OUT + DEVICE_OVERHEAD_BYTES}
    assert estimate_memory(b, ["-c", "2048", "-ngl", "5"], ["CUDA0"]) == full
    assert estimate_memory(b, ["-c", "2048"], ["CUDA0"]) == full  # llama-server's auto
    # -ngl 0 and no device at all: the CPU estimate
    cpu = estimate_bytes(b, ["-c", "2048"])
    assert estimate_memory(b, ["-c", "2048", "-ngl", "0"], ["CUDA0"]).devices == {}
    assert estimate_memory(b, ["-c", "2048"], []).ram == cpu
    assert cpu == b.size_bytes + OVERHEAD_BYTES + B_KV * 2048


def test_two_devices_split_the_layers_as_llama_cpp_does(b: CatalogModel) -> None:
    kv_layer = B_KV * 512 // 4
    # an even split of 5 (4 layers + output): layer i goes to the first device whose
    # cumulative share exceeds i/5 -> 0/5, 1/5, 2/5 on CUDA0 (< 0.5), 3/5, 4/5 on CUDA1
    need = estimate_memory(b, ["-c", "512", "-ts", "1,1"], ["CUDA0", "CUDA1"])
    assert need.devices == {
        "CUDA0": 3 * (B_LAYER + kv_layer) + DEVICE_OVERHEAD_BYTES,
        "CUDA1": B_LAYER + kv_layer + B_OUT + DEVICE_OVERHEAD_BYTES,
    }
    # without --tensor-split the shares follow free memory: 3:1 -> 0, 1/5, 2/5, 3/5 on
    # CUDA0 (< 0.75), the output (4/5) on CUDA1
    free = {"CUDA0": 3000 * MIB, "CUDA1": 1000 * MIB}
    need = estimate_memory(b, ["-c", "512"], ["CUDA0", "CUDA1"], free)
    assert need.devices == {
        "CUDA0": 4 * (B_LAYER + kv_layer) + DEVICE_OVERHEAD_BYTES,
        "CUDA1": B_OUT + DEVICE_OVERHEAD_BYTES,
    }
    # -sm none: everything on the main GPU
    need = estimate_memory(b, ["-c", "512", "-sm", "none", "-mg", "1"], ["CUDA0", "CUDA1"])
    assert set(need.devices) == {"CUDA1"}
    assert split_shares(["-ts", "3,1"], ["X", "Y"]) == [0.75, 0.25]
    assert gpu_layers(["--n-gpu-layers=all"], 4) == 5
    assert gpu_layers(["-ngl", "-1"], 4) == 5
    assert gpu_layers(["-ngl", "3"], 4) == 3


def test_a_tied_output_copies_the_embedding_to_the_device(a: CatalogModel) -> None:
    assert a.weights is not None
    tied = CatalogModel(
        id="t",
        path=a.path,
        size_bytes=a.size_bytes,
        kv_bytes_per_token=A_KV,
        weights=type(a.weights)(layers=a.weights.layers, embedding=A_EMBD, output=256, tied=True),
    )
    need = estimate_memory(tied, ["-c", "1024"], ["CUDA0"])
    assert need.on("CUDA0") == 2 * A_LAYER + 256 + A_EMBD + A_KV * 1024 + DEVICE_OVERHEAD_BYTES


# -- placement with two devices -------------------------------------------------------------


def option(key: str, device: str, need: int, ram: int = 0) -> Placement:
    return Placement((device,), Load(key, estimate=ram, devices={device: need}))


def test_two_models_that_each_fit_one_gpu_go_to_different_gpus() -> None:
    free = {"GPU0": 1000, "GPU1": 900}
    limits = Limits(max_instances=4)
    first, plan = place([option("a", "GPU0", 600), option("a", "GPU1", 600)], [], limits, 0.0,
                        None, free)  # fmt: skip
    assert (first.devices, plan) == (("GPU0",), Start())  # the one with more left
    # a is still starting on GPU0 (its memory not yet taken there): b goes to GPU1
    starting = [Resident("a", ModelState.LOADING, devices={"GPU0": 600})]
    second, plan = place([option("b", "GPU0", 600), option("b", "GPU1", 600)], starting,
                         limits, 0.0, None, free)  # fmt: skip
    assert (second.devices, plan) == (("GPU1",), Start())


def test_room_on_a_device_is_made_only_by_evicting_what_is_on_it() -> None:
    # a (idle, newer) on GPU0; b (idle, least recently used) on GPU1, which is too small
    # for c anyway: c goes to GPU0 and a is the one evicted, though b is older
    residents = [
        Resident("a", ModelState.LOADED, last_used=20.0, devices={"GPU0": 700}),
        Resident("b", ModelState.LOADED, last_used=10.0, devices={"GPU1": 300}),
    ]
    free = {"GPU0": 300, "GPU1": 200}  # what is left with a and b loaded
    options = [option("c", "GPU0", 800), option("c", "GPU1", 800)]
    chosen, plan = place(options, residents, Limits(max_instances=4), 30.0, None, free)
    assert (chosen.devices, plan) == (("GPU0",), Evict(("a",)))
    # GPU1 alone says why it cannot: the device, both numbers
    refused = plan_room(options[1].load, residents, Limits(max_instances=4), 30.0, None, free)
    assert isinstance(refused, Refuse)
    assert "on GPU1" in refused.reason and "800 B there" in refused.reason
    assert "500 B is free on it" in refused.reason  # 200 free + b's 300


def test_ram_and_device_budgets_both_apply() -> None:
    load = Load("c", estimate=500, devices={"GPU0": 100})
    residents = [Resident("a", ModelState.LOADED, estimate=400, last_used=1.0)]
    # the device has room, RAM has not: a (RAM only) goes
    assert plan_room(load, residents, Limits(4), 5.0, 200, {"GPU0": 1000}) == Evict(("a",))
    # a device that is still being freed (b unloading) is waited for
    residents = [Resident("b", ModelState.UNLOADING, devices={"GPU0": 900})]
    assert plan_room(load, residents, Limits(4), 5.0, 10_000, {"GPU0": 50}) == Wait()
    # no memory check: nothing is counted
    unchecked = Limits(4, memory_check=False)
    assert plan_room(load, [], unchecked, 5.0, 0, {"GPU0": 0}) == Start()


# -- what NVML and llama-server's log say ---------------------------------------------------


class FakeNVML:
    """pynvml's calls that corral makes, over made-up devices (PCI bus order)."""

    def __init__(self, memory: list[tuple[str, int, int]]) -> None:
        self.memory = memory  # (uuid, total, free)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.memory)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return [m[0] for m in self.memory].index(uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        _, total, free = self.memory[handle]
        return SimpleNamespace(total=total, free=free)


def test_nvml_numbers_devices_as_llama_server_sees_them(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML([("GPU-aaa", 24 * MIB, 20 * MIB), ("GPU-bbb", 16 * MIB, 1 * MIB)])
    monkeypatch.setattr(devices, "_nvml_state", {"module": fake})
    assert nvml_memory({}) == {"CUDA0": (24 * MIB, 20 * MIB), "CUDA1": (16 * MIB, 1 * MIB)}
    # CUDA_VISIBLE_DEVICES renumbers: by index or by UUID
    assert nvml_memory({"CUDA_VISIBLE_DEVICES": "1"}) == {"CUDA0": (16 * MIB, 1 * MIB)}
    both = nvml_memory({"CUDA_VISIBLE_DEVICES": "GPU-bbb,0"})
    assert both == {"CUDA0": (16 * MIB, 1 * MIB), "CUDA1": (24 * MIB, 20 * MIB)}
    # what cannot be matched is not guessed at
    assert nvml_memory({"CUDA_VISIBLE_DEVICES": "MIG-123"}) is None
    assert nvml_memory({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}) is None
    monkeypatch.setattr(devices, "_nvml_state", {"module": None})  # no library, no driver
    assert nvml_memory({}) is None


CUDA_OOM = (
    (
        "llama_kv_cache:      CUDA0 KV buffer size =   379.23 MiB\n"
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 8192.00 MiB on device 1: "
        "cudaMalloc failed: out of memory\n"
    )
    + """\
alloc_tensor_range: failed to allocate CUDA1 buffer of size 8589934592
llama_model_load: error loading model: unable to allocate CUDA1 buffer
"""
)
VULKAN_OOM = """\
ggml_vulkan: Device memory allocation of size 4294967296 failed.
ggml_vulkan: Requested buffer size exceeds device memory allocation limit: ErrorOutOfDeviceMemory
"""


def test_a_failed_allocation_is_read_with_its_device_and_size() -> None:
    oom = out_of_memory(CUDA_OOM.splitlines())
    assert oom is not None
    assert (oom.device, oom.requested) == ("CUDA1", 8 * 1024 * MIB)
    assert oom.describe() == "out of memory on CUDA1 (an allocation of 8192.0 MiB failed)"
    vulkan = out_of_memory(VULKAN_OOM.splitlines())
    assert vulkan is not None and (vulkan.device, vulkan.requested) == (None, 4096 * MIB)
    kv = out_of_memory(["llama_kv_cache: failed to allocate buffer for 65536 cells"])
    assert kv is not None and kv.device is None
    assert out_of_memory(["main: model loaded", "srv  update_slots: all slots are idle"]) is None


def test_the_supervisor_reports_nvmls_live_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.protocol import DeviceReport
    from corral.supervisor.instance import SupervisedInstance

    supervised = SupervisedInstance(["llama-server"], "http://127.0.0.1:1/health")
    supervised.devices = (
        DeviceReport("CUDA0", "NVIDIA L4", 22478, 22150),  # as listed at first
        DeviceReport("Vulkan0", "llvmpipe", 2048, 2048),  # NVML knows no Vulkan device
    )
    monkeypatch.setattr(devices, "_nvml_state", {"module": None})
    assert supervised.report().devices == supervised.devices
    fake = FakeNVML([("GPU-aaa", 22478 * MIB, 1024 * MIB)])  # a model loaded since
    monkeypatch.setattr(devices, "_nvml_state", {"module": fake})
    cuda, vulkan = supervised.report().devices
    assert (cuda.name, cuda.total_mib, cuda.free_mib) == ("CUDA0", 22478, 1024)
    assert vulkan == supervised.devices[1]
