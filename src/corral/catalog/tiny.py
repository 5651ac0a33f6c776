"""Generate a tiny, valid llama-architecture GGUF model with random weights.

corral routes requests; it never judges answers. Its real-process tests and its
benchmarks still need the *real* ``llama-server`` to load a model, report slots, stream
tokens and count cached prompt tokens. Downloading a real model is slow, large and
needs the network, so we write one: a llama graph with seeded random weights, a small
SentencePiece-style vocabulary (control tokens, the 256 byte tokens, a few hundred
``▁``-prefixed word pieces) and a ChatML chat template. The default model is a few
hundred kilobytes and loads in well under a second; the size parameters scale it up
so a benchmark can make each token slow enough for slots to fill.

Defaults (all keyword arguments of :func:`make_tiny_model`):

=============  =======================  ==============================================
parameter      default                  why
=============  =======================  ==============================================
n_embd         64                       smallest width that keeps 4 heads of 16 dims
n_layer        2                        >1 so per-layer code paths (KV cache) run
n_head         4                        head dim 16, even, as RoPE needs
n_head_kv      ``n_head``               plain multi-head attention; set lower for GQA
n_ff           ``4 * n_embd``           the classic transformer ratio
n_ctx          4096                     training context; ``-c`` may ask for less
n_words        400                      "a few hundred" word pieces
seed           0                        same seed, same bytes
name           ``"tiny"``               ``general.name`` shown in ``/props``
dtype          ``"f32"``                ``"f16"`` halves big models' files
=============  =======================  ==============================================

Generated text is noise, but clean noise: the output matrix is built so that control
tokens and byte tokens get a very low logit (see :func:`_output_weights`). The model
therefore never emits end-of-generation on its own, so a request always runs to
``max_tokens`` (``finish_reason == "length"``), which keeps benchmarks' token counts
exact, and it never emits lone bytes that would be invalid UTF-8.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "BYTE_TOKEN_COUNT",
    "CHAT_TEMPLATE",
    "CONTROL_TOKENS",
    "DEFAULT_N_WORDS",
    "TinyModelShape",
    "estimate_model_bytes",
    "make_tiny_model",
    "tiny_model_shape",
]

logger = logging.getLogger(__name__)

WeightDType = Literal["f32", "f16"]

DEFAULT_N_WORDS = 400
"""Word pieces after the control and byte tokens ("a few hundred")."""

RMS_NORM_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0

UNK, BOS, EOS, IM_START, IM_END = "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
CONTROL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, IM_START, IM_END)
"""Special tokens at ids 0..4, in this order: llama's SentencePiece trio, then ChatML's
turn markers. ``<unk>`` has token type UNKNOWN, as in real llama vocabularies; the
others are CONTROL. ``<|im_end|>`` is the EOS token because it ends every turn in the
chat template; llama.cpp treats ``</s>`` as end-of-generation too."""

BYTE_TOKEN_COUNT = 256
"""``<0x00>``..``<0xFF>``: SentencePiece byte fallback, so any UTF-8 text tokenizes."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
"""Plain ChatML: llama-server's Jinja engine renders it and the ChatML markers are in
the vocabulary as control tokens, so the rendered prompt tokenizes to them."""

_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker

_COMMON_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have "
    "this from or had by word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them "
    "write would like so these her long make thing see him two has look more day could "
    "go come did number sound no most people my over know water than call first who may "
    "down side been now find any new work part take get place made live where after back "
    "little only round man year came show every good me give our under name very through "
    "just form sentence great think say help low line differ turn cause much mean before "
    "move right boy old too same tell does set three want air well also play small end "
    "put home read hand port large spell add even land here must big high such follow "
    "act why ask men change went light kind off need house picture try us again animal "
    "point mother world near build self earth father head stand own page should country "
    "found answer school grow study still learn plant cover food sun four between state "
    "keep eye never last let thought city tree cross farm hard start might story saw far "
    "sea draw left late run while press close night real life few north open seem "
    "together next white children begin got walk example ease paper group always music "
    "those both mark often letter until mile river car feet care second book carry took "
    "science eat room friend began idea fish mountain stop once base hear horse cut sure "
    "watch color face wood main enough plain girl usual young ready above ever red list "
    "though feel talk bird soon body dog family direct pose leave song measure door "
    "product black short numeral class wind question happen complete ship area half rock "
    "order fire south problem piece told knew pass since top whole king space heard best "
    "hour better true during hundred five remember step early hold west ground interest "
    "reach fast verb sing listen six table travel less morning ten simple several vowel "
    "toward war lay against pattern slow center love person money serve appear road map "
    "rain rule govern pull cold notice voice unit power town fine certain fly fall lead "
    "cry dark machine note wait plan figure star box noun field rest correct able pound "
    "done beauty drive stood contain front teach week final gave green oh quick develop "
    "ocean warm free minute strong special mind behind clear tail produce fact street "
    "inch multiply nothing course stay wheel full force blue object decide surface deep "
    "moon island foot system busy test record boat common gold possible plane stead dry "
    "wonder laugh thousand ago ran check game shape equate hot miss brought heat snow "
    "tire bring yes distant fill east paint language among"
).split()


@dataclass(frozen=True, slots=True)
class TinyModelShape:
    """Every size a tiny model derives from its parameters, computed in one place so the
    writer, :func:`estimate_model_bytes` and tests agree on them."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    n_words: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        """Width of the K and V projections (smaller than ``n_embd`` under GQA)."""
        return self.head_dim * self.n_head_kv

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> numpy shape, in file order.

        numpy shapes are ggml's ``ne`` reversed: llama.cpp expects ``attn_q`` as
        ``{n_embd, n_embd}`` and ``ffn_down`` as ``{n_ff, n_embd}`` in ``ne`` order, i.e.
        numpy ``(out_features, in_features)``.
        """
        names = gguf.TENSOR_NAMES
        t = gguf.MODEL_TENSOR
        shapes: dict[str, tuple[int, ...]] = {
            f"{names[t.TOKEN_EMBD]}.weight": (self.n_vocab, self.n_embd),
            f"{names[t.OUTPUT_NORM]}.weight": (self.n_embd,),
            f"{names[t.OUTPUT]}.weight": (self.n_vocab, self.n_embd),
        }
        per_layer: tuple[tuple[gguf.MODEL_TENSOR, tuple[int, ...]], ...] = (
            (t.ATTN_NORM, (self.n_embd,)),
            (t.ATTN_Q, (self.n_embd, self.n_embd)),
            (t.ATTN_K, (self.n_embd_kv, self.n_embd)),
            (t.ATTN_V, (self.n_embd_kv, self.n_embd)),
            (t.ATTN_OUT, (self.n_embd, self.n_embd)),
            (t.FFN_NORM, (self.n_embd,)),
            (t.FFN_GATE, (self.n_ff, self.n_embd)),
            (t.FFN_UP, (self.n_ff, self.n_embd)),
            (t.FFN_DOWN, (self.n_embd, self.n_ff)),
        )
        for layer in range(self.n_layer):
            for tensor, shape in per_layer:
                shapes[f"{names[tensor].format(bid=layer)}.weight"] = shape
        return shapes


def tiny_model_shape(
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    n_ctx: int = 4096,
    n_words: int = DEFAULT_N_WORDS,
) -> TinyModelShape:
    """Validate size parameters and derive the model's shape.

    Raises ``ValueError`` for sizes llama.cpp would reject at load time (odd head
    dimension for RoPE, heads not dividing the width, KV heads not dividing heads), so
    a bad benchmark setting fails here with a clear message rather than in a server log.
    """
    kv_heads = n_head if n_head_kv is None else n_head_kv
    ff = 4 * n_embd if n_ff is None else n_ff
    for label, value in (
        ("n_embd", n_embd),
        ("n_layer", n_layer),
        ("n_head", n_head),
        ("n_head_kv", kv_heads),
        ("n_ff", ff),
        ("n_ctx", n_ctx),
        ("n_words", n_words),
    ):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    if (n_embd // n_head) % 2:
        raise ValueError(f"head dimension n_embd/n_head ({n_embd // n_head}) must be even")
    if n_head % kv_heads:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({kv_heads})")
    return TinyModelShape(
        n_vocab=len(CONTROL_TOKENS) + BYTE_TOKEN_COUNT + n_words,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=kv_heads,
        n_ff=ff,
        n_ctx=n_ctx,
        n_words=n_words,
    )


def estimate_model_bytes(
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    n_ctx: int = 4096,
    n_words: int = DEFAULT_N_WORDS,
    dtype: WeightDType = "f32",
) -> int:
    """Approximate file size of :func:`make_tiny_model` with the same arguments.

    Benchmarks use it to check disk space and to pick sizes before spending seconds
    writing a file. Tensor data is exact (with 32-byte alignment); the header,
    vocabulary and template are estimated, within a few kilobytes.
    """
    shape = tiny_model_shape(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_ctx=n_ctx,
        n_words=n_words,
    )
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    data = 0
    infos = 0
    for name, dims in shape.tensor_shapes().items():
        itemsize = 4 if len(dims) == 1 or dtype == "f32" else 2
        data += -(-int(np.prod(dims)) * itemsize // align) * align
        infos += 8 + len(name) + 4 + 8 * len(dims) + 4 + 8
    # Per token: string length (8) + ~8 bytes of text + score (4) + type (4).
    vocab = shape.n_vocab * 24
    return 1024 + len(CHAT_TEMPLATE) + vocab + infos + align + data


def make_tiny_model(
    path: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    n_ctx: int = 4096,
    n_words: int = DEFAULT_N_WORDS,
    seed: int = 0,
    name: str = "tiny",
    dtype: WeightDType = "f32",
) -> Path:
    """Write a llama-architecture GGUF with seeded random weights to ``path``.

    The file appears atomically (written beside ``path`` under a temporary name, then
    renamed), so a concurrent reader or a crashed writer never leaves a half-written
    model where llama-server would try to load it. Parent directories are created.
    The same arguments always give byte-identical files; a different ``seed`` gives
    different weights. ``dtype="f16"`` stores the 2-D weights as F16 (norms stay F32,
    as llama.cpp expects), halving big models. Returns ``path``.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    shape = tiny_model_shape(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_ctx=n_ctx,
        n_words=n_words,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        _write(tmp_path, shape, seed=seed, name=name, dtype=dtype)
        tmp_path.chmod(0o644)  # mkstemp's 0600 would hide the model from other users
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    logger.info(
        "tiny_model_written path=%s bytes=%d n_vocab=%d n_embd=%d n_layer=%d n_head=%d "
        "n_head_kv=%d n_ff=%d dtype=%s seed=%d",
        path,
        path.stat().st_size,
        shape.n_vocab,
        shape.n_embd,
        shape.n_layer,
        shape.n_head,
        shape.n_head_kv,
        shape.n_ff,
        dtype,
        seed,
    )
    return path


def _write(path: Path, shape: TinyModelShape, *, seed: int, name: str, dtype: WeightDType) -> None:
    """Stream the GGUF to ``path``: metadata first, then one tensor at a time, so a big
    benchmark model never has all its weights in memory at once."""
    tokens, scores, token_types = _vocabulary(shape.n_words)
    assert len(tokens) == shape.n_vocab

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_name(name)
        writer.add_file_type(
            gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
        )
        writer.add_vocab_size(shape.n_vocab)
        writer.add_context_length(shape.n_ctx)
        writer.add_embedding_length(shape.n_embd)
        writer.add_block_count(shape.n_layer)
        writer.add_feed_forward_length(shape.n_ff)
        writer.add_head_count(shape.n_head)
        writer.add_head_count_kv(shape.n_head_kv)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_layer_norm_rms_eps(RMS_NORM_EPS)

        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(token_types)
        writer.add_unk_token_id(CONTROL_TOKENS.index(UNK))
        writer.add_bos_token_id(CONTROL_TOKENS.index(BOS))
        writer.add_eos_token_id(CONTROL_TOKENS.index(IM_END))
        writer.add_pad_token_id(CONTROL_TOKENS.index(UNK))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

        shapes = shape.tensor_shapes()
        for tensor_name, dims in shapes.items():
            np_dtype = np.float32 if len(dims) == 1 or dtype == "f32" else np.float16
            nbytes = int(np.prod(dims)) * np.dtype(np_dtype).itemsize
            writer.add_tensor_info(tensor_name, dims, np.dtype(np_dtype), nbytes)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor_name, data in _weights(shape, token_types, seed):
            assert data.shape == shapes[tensor_name], tensor_name
            np_dtype = np.float32 if data.ndim == 1 or dtype == "f32" else np.float16
            writer.write_tensor_data(data.astype(np_dtype, copy=False))
    finally:
        writer.close()


def _vocabulary(n_words: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a SentencePiece-style (``llama``) vocabulary.

    Ids 0..4 are :data:`CONTROL_TOKENS`, then the 256 byte tokens that make byte
    fallback work, then ``n_words`` NORMAL pieces. SentencePiece merges adjacent pieces
    by score, highest first; scores fall with the id as in real llama vocabularies. The
    vocabulary does not depend on the seed, so models differing only in seed share
    their tokenization.
    """
    tokens = list(CONTROL_TOKENS)
    types = [
        int(gguf.TokenType.UNKNOWN) if tok == UNK else int(gguf.TokenType.CONTROL)
        for tok in CONTROL_TOKENS
    ]
    tokens += [f"<0x{b:02X}>" for b in range(BYTE_TOKEN_COUNT)]
    types += [int(gguf.TokenType.BYTE)] * BYTE_TOKEN_COUNT
    words = list(itertools.islice(_word_pieces(), n_words))
    tokens += words
    types += [int(gguf.TokenType.NORMAL)] * len(words)
    scores = [0.0] * (len(CONTROL_TOKENS) + BYTE_TOKEN_COUNT)
    scores += [-float(i) for i in range(len(words))]
    return tokens, scores, types


def _word_pieces() -> Iterator[str]:
    """Unique NORMAL pieces, most useful first: the boundary marker, single letters (so
    SentencePiece can build words by merging), common words with the ``▁`` prefix, then
    an endless supply of syllable pairs for callers asking for a big vocabulary."""
    seen: set[str] = set()

    def fresh(candidates: Iterator[str]) -> Iterator[str]:
        for piece in candidates:
            if piece not in seen:
                seen.add(piece)
                yield piece

    letters = "abcdefghijklmnopqrstuvwxyz"
    yield from fresh(iter([_SPACE]))
    yield from fresh(iter(letters))
    yield from fresh(_SPACE + c for c in letters)
    yield from fresh(iter(".,!?'-0123456789"))
    yield from fresh(_SPACE + w for w in _COMMON_WORDS)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    for length in itertools.count(1):
        for combo in itertools.product(syllables, repeat=length):
            yield from fresh(iter([_SPACE + "".join(combo)]))


def _weights(
    shape: TinyModelShape, token_types: list[int], seed: int
) -> Iterator[tuple[str, npt.NDArray[np.float32]]]:
    """Yield ``(name, float32 array)`` in :meth:`TinyModelShape.tensor_shapes` order.

    Weight scales follow ``1/sqrt(fan_in)`` so activations stay O(1) at any width, with
    the residual-branch outputs (``attn_output``, ``ffn_down``) scaled down further so
    that the embedding's constant channel (see :func:`_output_weights`) survives every
    layer. Norm weights are ones.
    """
    rng = np.random.default_rng(seed)
    e = shape.n_embd

    def normal(dims: tuple[int, ...], std: float) -> npt.NDArray[np.float32]:
        return rng.standard_normal(dims, dtype=np.float32) * np.float32(std)

    ones = np.ones(e, dtype=np.float32)
    for tensor_name, dims in shape.tensor_shapes().items():
        if len(dims) == 1:
            yield tensor_name, ones
        elif tensor_name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD]):
            embd = normal(dims, 1.0 / np.sqrt(e))
            embd[:, 0] = 1.0
            yield tensor_name, embd
        elif tensor_name == f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT]}.weight":
            yield tensor_name, _output_weights(normal(dims, 1.0 / np.sqrt(e)), token_types)
        elif ".attn_output." in tensor_name or ".ffn_down." in tensor_name:
            yield tensor_name, normal(dims, 0.01 / np.sqrt(dims[1]))
        else:
            yield tensor_name, normal(dims, 1.0 / np.sqrt(dims[1]))


def _output_weights(
    output: npt.NDArray[np.float32], token_types: list[int]
) -> npt.NDArray[np.float32]:
    """Make every non-NORMAL token (control, unknown, byte) practically unsampleable.

    Every token embedding has channel 0 set to 1.0 while the other channels are small
    and the layers add little, so after the final RMS norm channel 0 is large and
    positive for every position. Giving non-NORMAL tokens a large negative weight on
    channel 0 (and NORMAL tokens none) puts their logits tens of units below the rest:
    the model never ends a turn early and never emits bare bytes.
    """
    types = np.asarray(token_types)
    normal_rows = types == int(gguf.TokenType.NORMAL)
    output[normal_rows, 0] = 0.0
    output[~normal_rows, 0] = -4.0
    return output
