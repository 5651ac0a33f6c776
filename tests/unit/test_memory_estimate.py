"""Memory estimates from GGUF headers, and admission that compares them with what is free."""

from __future__ import annotations

from pathlib import Path

from corral.catalog.discovery import scan
from corral.catalog.gguf_header import read_gguf_metadata
from corral.catalog.memory import OVERHEAD_BYTES, context_tokens, estimate_bytes
from corral.catalog.tiny import make_tiny_model


def test_kv_cache_size_comes_from_the_attention_shape(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m.gguf", n_embd=64, n_layer=2, n_head=4, n_head_kv=2)
    meta = read_gguf_metadata(path)
    # 2 layers * 2 kv heads * (16 + 16) head dims * 2 bytes (f16)
    assert meta.kv_bytes_per_token == 2 * 2 * 32 * 2


def test_estimate_is_weights_plus_kv_cache_for_the_context_in_use(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "m.gguf", n_ctx=4096)
    (model,) = scan([tmp_path])
    assert model.kv_bytes_per_token
    per_token = model.kv_bytes_per_token
    assert context_tokens(model, []) == 4096  # llama-server's -c 0: the trained context
    assert context_tokens(model, ["-c", "1024"]) == 1024
    assert context_tokens(model, ["--ctx-size=2048"]) == 2048
    base = model.size_bytes + OVERHEAD_BYTES
    assert estimate_bytes(model, ["-c", "1024"]) == base + per_token * 1024
    quantized = estimate_bytes(model, ["-c", "1024", "-ctk", "q8_0", "-ctv", "q8_0"])
    assert quantized < estimate_bytes(model, ["-c", "1024"])
