"""The GGUF header reader: a model file's metadata without loading it.

Why not ``gguf.GGUFReader``: it builds a numpy view for every element of every
metadata array, so a real model's 150k-token vocabulary takes ~12 s to open. The
reader here walks the same format (using the ``gguf`` package's constants and enums)
with ``struct`` over an ``mmap``, skipping arrays by length: tens of milliseconds, and
only the header's pages are ever read from disk.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

_MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFError(ValueError):
    """A file that is not a usable GGUF model; the message says why."""


@dataclass(frozen=True, slots=True)
class GGUFMetadata:
    """What one GGUF file's header says (nothing here needed the tensor data)."""

    path: Path
    size_bytes: int
    version: int
    gguf_type: str
    """``general.type``: ``model`` (also when absent), ``mmproj``, ``adapter`` ..."""
    architecture: str | None
    name: str | None
    context_length: int | None
    file_type: int | None
    quantization: str | None
    """``general.file_type`` as a name (``Q4_K_M``, ``F16``); without it, the type of
    most weights (``Q4_K``); ``None`` for a file without 2-D tensors."""
    has_chat_template: bool
    parameter_count: int
    tensor_count: int
    split_no: int | None
    split_count: int | None
    kv_bytes_per_token: int | None = None
    """Bytes of K and V cache one token of context takes at f16 (all layers), from
    the attention shape in the header; None when the header does not say."""
    weights: WeightLayout | None = None
    """Where the tensor bytes are: per repeating layer, the input embedding, the output
    (for the GPU memory estimate: ``-ngl`` offloads whole layers)."""


@dataclass(frozen=True, slots=True)
class WeightLayout:
    """A model's tensor bytes by where llama.cpp puts them.

    ``layers[i]`` is every ``blk.i.*`` tensor; ``embedding`` is ``token_embd`` (llama.cpp
    keeps the input layer on the CPU); ``output`` is the rest (``output.weight``, the
    final norm ...), which goes to a GPU with the last offloaded layer. A model whose
    output reuses the embedding (``tied``: no ``output.weight``) has llama.cpp copy the
    embedding to the output's device.
    """

    layers: tuple[int, ...] = ()
    embedding: int = 0
    output: int = 0
    tied: bool = False

    @property
    def total(self) -> int:
        return sum(self.layers) + self.embedding + self.output

    def merged(self, other: WeightLayout) -> WeightLayout:
        """The layout of a split model from two of its shards'."""
        count = max(len(self.layers), len(other.layers))
        mine = (*self.layers, *([0] * (count - len(self.layers))))
        theirs = (*other.layers, *([0] * (count - len(other.layers))))
        return WeightLayout(
            layers=tuple(a + b for a, b in zip(mine, theirs, strict=True)),
            embedding=self.embedding + other.embedding,
            output=self.output + other.output,
            tied=self.tied and other.tied,
        )


_SCALARS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}
_STRING = int(gguf.GGUFValueType.STRING)
_ARRAY = int(gguf.GGUFValueType.ARRAY)


class _Header:
    """A cursor over a mapped GGUF header; every read is bounds-checked by ``struct``."""

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.order = order
        self.off = 0
        self._u32 = struct.Struct(order + "I")
        self._u64 = struct.Struct(order + "Q")

    def u32(self) -> int:
        (value,) = self._u32.unpack_from(self.buf, self.off)
        self.off += 4
        return int(value)

    def u64(self) -> int:
        (value,) = self._u64.unpack_from(self.buf, self.off)
        self.off += 8
        return int(value)

    def string(self) -> str:
        length = self.u64()
        end = self.off + length
        if end > len(self.buf):
            raise GGUFError(f"truncated header: a string at byte {self.off} runs past the end")
        text = self.buf[self.off : end].decode("utf-8", errors="replace")
        self.off = end
        return text

    def value(self, kind: int) -> Any:
        """Read one value; arrays are skipped (``None``), since nothing we need is one."""
        fmt = _SCALARS.get(kind)
        if fmt is not None:
            (value,) = struct.unpack_from(self.order + fmt, self.buf, self.off)
            self.off += struct.calcsize(fmt)
            return value
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            self.skip_array()
            return None
        raise GGUFError(f"unknown metadata value type {kind} at byte {self.off}")

    def skip_array(self) -> None:
        item = self.u32()
        count = self.u64()
        fmt = _SCALARS.get(item)
        if fmt is not None:
            self.off += count * struct.calcsize(fmt)
        elif item == _STRING:
            # A vocabulary is 100k+ strings: walk their lengths with local names only.
            unpack, buf, off = self._u64.unpack_from, self.buf, self.off
            for _ in range(count):
                off += 8 + unpack(buf, off)[0]
            self.off = off
        elif item == _ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            raise GGUFError(f"unknown array item type {item} at byte {self.off}")
        if self.off > len(self.buf):
            raise GGUFError("truncated header: a metadata array runs past the end")


def read_gguf_metadata(path: Path) -> GGUFMetadata:
    """Read a GGUF file's header through ``mmap``; raise :class:`GGUFError` if it isn't one.

    Besides the metadata, it checks that every tensor's data lies inside the file, which
    is what catches the most common bad file: an interrupted download.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # opening a FIFO would block forever
            raise GGUFError("not a regular file")
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise GGUFError("empty file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except GGUFError:
        raise
    except struct.error as exc:
        raise GGUFError(f"truncated or malformed header ({exc})") from exc
    except OSError as exc:
        raise GGUFError(exc.strerror or str(exc)) from exc
    except (ValueError, OverflowError, MemoryError) as exc:
        raise GGUFError(f"malformed header ({exc})") from exc


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFMetadata:
    if buf[:4] != b"GGUF":
        raise GGUFError(f"not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # written on a big-endian machine, as gguf's reader checks
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
    header = _Header(buf, order)
    header.off = 8
    n_tensors = header.u64()
    n_kv = header.u64()
    values: dict[str, Any] = {}
    for _ in range(n_kv):
        key = header.string()
        values[key] = header.value(header.u32())

    alignment = values.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"bad general.alignment {alignment!r}: must be a power of two")

    parameters = 0
    data_end = 0
    by_type: dict[int, int] = {}
    layers: dict[int, int] = {}
    embedding = output = 0
    has_output = False
    for _ in range(n_tensors):
        name = header.string()
        n_dims = header.u32()
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (at most 4)")
        dims = [header.u64() for _ in range(n_dims)]
        kind = header.u32()
        offset = header.u64()
        elements = math.prod(dims)
        parameters += elements
        if n_dims >= 2:
            by_type[kind] = by_type.get(kind, 0) + elements
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            continue  # a type newer than this gguf package: can't size it, don't guess
        nbytes = elements * type_size // block
        data_end = max(data_end, offset + nbytes)
        part, _, rest = name.partition(".")
        if part == "blk" and rest.split(".", 1)[0].isdigit():
            index = int(rest.split(".", 1)[0])
            layers[index] = layers.get(index, 0) + nbytes
        elif part == "token_embd":
            embedding += nbytes
        else:
            output += nbytes
            has_output = has_output or name == "output.weight"
    data_start = -(-header.off // alignment) * alignment
    if data_start + data_end > size:
        raise GGUFError(
            f"truncated: tensor data needs {data_start + data_end} bytes but the file has "
            f"{size} (an interrupted download?)"
        )

    architecture = _str(values.get(gguf.Keys.General.ARCHITECTURE))
    context = None
    if architecture:
        context = _int(values.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=architecture)))
    file_type = _int(values.get(gguf.Keys.General.FILE_TYPE))
    template = values.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    has_template = (isinstance(template, str) and bool(template.strip())) or any(
        k.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE + ".") for k in values
    )
    blocks = _int(values.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=architecture or "")))
    count = max(blocks or 0, max(layers, default=-1) + 1)
    weights = WeightLayout(
        layers=tuple(layers.get(i, 0) for i in range(count)),
        embedding=embedding,
        output=output,
        tied=not has_output and embedding > 0,
    )
    return GGUFMetadata(
        kv_bytes_per_token=_kv_bytes_per_token(values, architecture),
        weights=weights if n_tensors else None,
        path=path,
        size_bytes=size,
        version=int(version),
        gguf_type=_str(values.get(gguf.Keys.General.TYPE)) or "model",
        architecture=architecture,
        name=_str(values.get(gguf.Keys.General.NAME)),
        context_length=context,
        file_type=file_type,
        quantization=quantization_name(file_type, by_type),
        has_chat_template=has_template,
        parameter_count=parameters,
        tensor_count=n_tensors,
        split_no=_int(values.get(gguf.Keys.Split.LLM_KV_SPLIT_NO)),
        split_count=_int(values.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)),
    )


def _kv_bytes_per_token(values: Mapping[str, Any], arch: str | None) -> int | None:
    """f16 K+V bytes per token of context: 2 * layers * kv heads * head size * 2."""
    if not arch:
        return None

    def number(key: str) -> int | None:
        value = values.get(key.format(arch=arch))
        if isinstance(value, list):  # per-layer values: the largest bounds the cache
            value = max((v for v in value if isinstance(v, int)), default=None)
        return _int(value)

    layers = number(gguf.Keys.LLM.BLOCK_COUNT)
    embd = number(gguf.Keys.LLM.EMBEDDING_LENGTH)
    heads = number(gguf.Keys.Attention.HEAD_COUNT)
    kv_heads = number(gguf.Keys.Attention.HEAD_COUNT_KV) or heads
    key_len = number(gguf.Keys.Attention.KEY_LENGTH)
    value_len = number(gguf.Keys.Attention.VALUE_LENGTH)
    if not layers or not kv_heads:
        return None
    if not key_len or not value_len:
        if not embd or not heads:
            return None
        key_len = value_len = embd // heads
    return layers * kv_heads * (key_len + value_len) * 2


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def quantization_name(file_type: int | None, weights_by_type: Mapping[int, int]) -> str | None:
    """``general.file_type`` -> ``Q4_K_M`` (``LlamaFileType`` without ``MOSTLY_``/``ALL_``).

    Files without it (or with ``GUESSED``) are named after the tensor type that holds most
    2-D weights, which is what llama.cpp guesses too.
    """
    if file_type is not None and file_type != gguf.LlamaFileType.GUESSED:
        try:
            name = gguf.LlamaFileType(file_type).name
        except ValueError:
            return f"file type {file_type}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if not weights_by_type:
        return None
    kind = max(weights_by_type, key=lambda k: (weights_by_type[k], -k))
    try:
        return gguf.GGMLQuantizationType(kind).name
    except ValueError:
        return f"tensor type {kind}"
