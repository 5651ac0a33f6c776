"""The tiny GGUF generator writes what llama.cpp's llama loader expects.

Read back with ``gguf.GGUFReader``: no llama-server needed here (tests/real/ proves the
real server loads and serves it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import pytest

from corral.catalog.tiny import (
    BYTE_TOKEN_COUNT,
    CONTROL_TOKENS,
    estimate_model_bytes,
    make_tiny_model,
    tiny_model_shape,
)

LLAMA = "llama"


def field(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.get_field(key)
    assert found is not None, f"missing GGUF key {key}"
    return found.contents()


def tensor_shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy shape (ggml ``ne`` reversed)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> gguf.GGUFReader:
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    return gguf.GGUFReader(path)


def test_model_declares_llama_architecture_and_name(default_model: gguf.GGUFReader) -> None:
    assert field(default_model, "general.architecture") == LLAMA
    assert field(default_model, "general.name") == "tiny"


def test_default_hparams_are_the_documented_defaults(default_model: gguf.GGUFReader) -> None:
    assert field(default_model, f"{LLAMA}.context_length") == 4096
    assert field(default_model, f"{LLAMA}.embedding_length") == 64
    assert field(default_model, f"{LLAMA}.block_count") == 2
    assert field(default_model, f"{LLAMA}.attention.head_count") == 4
    assert field(default_model, f"{LLAMA}.attention.head_count_kv") == 4
    assert field(default_model, f"{LLAMA}.feed_forward_length") == 256
    assert field(default_model, f"{LLAMA}.rope.dimension_count") == 16
    assert field(default_model, f"{LLAMA}.rope.freq_base") == pytest.approx(10000.0)
    eps = field(default_model, f"{LLAMA}.attention.layer_norm_rms_epsilon")
    assert eps == pytest.approx(1e-5)


def test_hparams_follow_size_parameters(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(
        make_tiny_model(
            tmp_path / "m.gguf",
            n_embd=96,
            n_layer=3,
            n_head=6,
            n_head_kv=2,
            n_ff=200,
            n_ctx=1024,
            n_words=50,
            name="bench",
        )
    )
    assert field(reader, "general.name") == "bench"
    assert field(reader, f"{LLAMA}.context_length") == 1024
    assert field(reader, f"{LLAMA}.embedding_length") == 96
    assert field(reader, f"{LLAMA}.block_count") == 3
    assert field(reader, f"{LLAMA}.attention.head_count") == 6
    assert field(reader, f"{LLAMA}.attention.head_count_kv") == 2
    assert field(reader, f"{LLAMA}.feed_forward_length") == 200
    assert field(reader, f"{LLAMA}.rope.dimension_count") == 16
    assert len(field(reader, "tokenizer.ggml.tokens")) == len(CONTROL_TOKENS) + 256 + 50


def test_vocabulary_has_control_tokens_and_all_byte_tokens(
    default_model: gguf.GGUFReader,
) -> None:
    tokens: list[str] = field(default_model, "tokenizer.ggml.tokens")
    types: list[int] = field(default_model, "tokenizer.ggml.token_type")
    scores: list[float] = field(default_model, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == len(set(tokens))
    type_of = dict(zip(tokens, types, strict=True))

    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert type_of["<unk>"] == gguf.TokenType.UNKNOWN
    for control in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        assert type_of[control] == gguf.TokenType.CONTROL, control

    for byte in range(BYTE_TOKEN_COUNT):
        assert type_of[f"<0x{byte:02X}>"] == gguf.TokenType.BYTE

    words = [t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.NORMAL]
    assert len(words) == 400
    assert "\u2581the" in words


def test_special_token_ids_and_bos_flag(default_model: gguf.GGUFReader) -> None:
    tokens: list[str] = field(default_model, "tokenizer.ggml.tokens")
    assert field(default_model, "tokenizer.ggml.model") == "llama"
    assert tokens[field(default_model, "tokenizer.ggml.bos_token_id")] == "<s>"
    assert tokens[field(default_model, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert tokens[field(default_model, "tokenizer.ggml.unknown_token_id")] == "<unk>"
    assert field(default_model, "tokenizer.ggml.padding_token_id") is not None
    assert field(default_model, "tokenizer.ggml.add_bos_token") is True


def test_chat_template_is_chatml(default_model: gguf.GGUFReader) -> None:
    template: str = field(default_model, "tokenizer.chat_template")
    assert "<|im_start|>" in template
    assert "<|im_end|>" in template
    assert "add_generation_prompt" in template


def test_tensors_follow_llama_shapes_for_default_size(default_model: gguf.GGUFReader) -> None:
    shapes = tensor_shapes(default_model)
    n_vocab = len(field(default_model, "tokenizer.ggml.tokens"))
    assert len(shapes) == 3 + 9 * 2
    assert shapes["token_embd.weight"] == (n_vocab, 64)
    assert shapes["output.weight"] == (n_vocab, 64)
    assert shapes["output_norm.weight"] == (64,)
    for layer in range(2):
        assert shapes[f"blk.{layer}.attn_q.weight"] == (64, 64)
        assert shapes[f"blk.{layer}.ffn_down.weight"] == (64, 256)


def test_tensor_count_and_shapes_scale_with_parameters(tmp_path: Path) -> None:
    path = make_tiny_model(
        tmp_path / "gqa.gguf", n_embd=128, n_layer=3, n_head=8, n_head_kv=2, n_ff=320
    )
    shapes = tensor_shapes(gguf.GGUFReader(path))
    assert len(shapes) == 3 + 9 * 3
    assert (
        shapes
        == tiny_model_shape(n_embd=128, n_layer=3, n_head=8, n_head_kv=2, n_ff=320).tensor_shapes()
    )
    kv_width = (128 // 8) * 2
    for layer in range(3):
        assert shapes[f"blk.{layer}.attn_norm.weight"] == (128,)
        assert shapes[f"blk.{layer}.attn_q.weight"] == (128, 128)
        assert shapes[f"blk.{layer}.attn_k.weight"] == (kv_width, 128)
        assert shapes[f"blk.{layer}.attn_v.weight"] == (kv_width, 128)
        assert shapes[f"blk.{layer}.attn_output.weight"] == (128, 128)
        assert shapes[f"blk.{layer}.ffn_norm.weight"] == (128,)
        assert shapes[f"blk.{layer}.ffn_gate.weight"] == (320, 128)
        assert shapes[f"blk.{layer}.ffn_up.weight"] == (320, 128)
        assert shapes[f"blk.{layer}.ffn_down.weight"] == (128, 320)


def test_f16_stores_matrices_as_f16_and_norms_as_f32(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(make_tiny_model(tmp_path / "h.gguf", dtype="f16"))
    for tensor in reader.tensors:
        expected = (
            gguf.GGMLQuantizationType.F32
            if len(tensor.shape) == 1
            else gguf.GGMLQuantizationType.F16
        )
        assert tensor.tensor_type == expected, tensor.name


def test_weights_are_small_finite_random_values(default_model: gguf.GGUFReader) -> None:
    for tensor in default_model.tensors:
        data = np.asarray(tensor.data)
        assert np.isfinite(data).all(), tensor.name
        assert np.abs(data).max() <= 8.0, tensor.name
    attn_q = next(t for t in default_model.tensors if t.name == "blk.0.attn_q.weight")
    assert np.asarray(attn_q.data).std() > 0


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a.gguf", seed=7)
    second = make_tiny_model(tmp_path / "b.gguf", seed=7)
    assert first.read_bytes() == second.read_bytes()


def test_different_seed_gives_different_bytes(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a.gguf", seed=1)
    second = make_tiny_model(tmp_path / "b.gguf", seed=2)
    assert first.stat().st_size == second.stat().st_size
    assert first.read_bytes() != second.read_bytes()


def test_write_creates_parent_dirs_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "tiny.gguf"
    assert make_tiny_model(target) == target
    assert [p.name for p in target.parent.iterdir()] == ["tiny.gguf"]


def test_rewrite_replaces_existing_model_atomically(tmp_path: Path) -> None:
    target = tmp_path / "tiny.gguf"
    target.write_bytes(b"not a model")
    make_tiny_model(target)
    assert gguf.GGUFReader(target).get_field("general.architecture") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_embd": 60, "n_head": 8},  # heads don't divide the width
        {"n_embd": 36, "n_head": 4},  # odd head dimension: RoPE needs pairs
        {"n_head": 4, "n_head_kv": 3},  # KV heads don't divide heads
        {"n_layer": 0},
        {"n_words": 0},
    ],
)
def test_impossible_sizes_are_rejected_before_writing(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "bad.gguf", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("n_embd", "n_layer", "dtype"),
    [(64, 2, "f32"), (256, 4, "f32"), (128, 2, "f16")],
)
def test_estimate_matches_written_size(
    tmp_path: Path, n_embd: int, n_layer: int, dtype: Literal["f32", "f16"]
) -> None:
    path = make_tiny_model(tmp_path / "e.gguf", n_embd=n_embd, n_layer=n_layer, dtype=dtype)
    estimate = estimate_model_bytes(n_embd=n_embd, n_layer=n_layer, dtype=dtype)
    assert abs(estimate - path.stat().st_size) <= 16 * 1024


def test_bigger_sizes_make_a_bigger_model() -> None:
    small = estimate_model_bytes()
    big = estimate_model_bytes(n_embd=1024, n_layer=8)
    assert big > 100 * small
    assert estimate_model_bytes(n_embd=1024, n_layer=8, dtype="f16") < big
