"""Per-request llama-server flags (the sidecar pattern): parse, normalize, allow-list.

A request may carry flags in ``X-Corral-Flags`` (or ``X-Agent-Flags``), e.g.
``X-Corral-Flags: -c 8192 -fa --temp 0.2``. corral runs (or reuses) an instance of the
model started with those flags; requests whose flags normalize to the same list share
it, within the same capacity limits as any other instance.

Normalization makes spellings that mean the same thing one key: short and long names
(``-c`` = ``--ctx-size``), ``--flag=value`` = ``--flag value``, a bare ``-fa`` =
``--flash-attn on``, numbers in one form (``0.50`` = ``0.5``), order (sorted by
flag), and a repeated flag (the last wins).

Only flags in :data:`ALLOWED` pass: sampling, cache and context flags. Everything
else is refused with a message naming the flag: the model, paths, host, port, keys, the
slot-save path and any flag corral does not know, since an unknown flag may read or
write files or open ports.

The header is split like a POSIX shell would split it (:func:`shlex.split`) but never
run by one: the result is an argument list.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from corral.supervisor.flags import DENIED

HEADERS = ("X-Corral-Flags", "X-Agent-Flags")

#: Longest header value accepted.
MAX_LENGTH = 1024


class RequestFlagError(ValueError):
    """Flags a request may not use; the message names the flag and why."""


#: llama-server parses integer flags with ``std::stoi``: a 32-bit int, or it exits.
INT32 = (-(2**31), 2**31 - 1)
#: Finite single-precision floats (sampling parameters are ``float``).
FLOAT32 = 3.4028234663852886e38


def _int_in(low: int, high: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        number = int(value, 10)
        if not low <= number <= high:
            raise ValueError(f"allowed: {low} to {high}")
        return str(number)

    check.range = (low, high)  # type: ignore[attr-defined]
    return check


def _float_in(low: float, high: float) -> Callable[[str], str]:
    def check(value: str) -> str:
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("not a finite number")
        if not low <= number <= high:
            raise ValueError(f"allowed: {low:g} to {high:g}")
        return repr(number).removesuffix(".0") if number.is_integer() else repr(number)

    check.range = (low, high)  # type: ignore[attr-defined]
    return check


_int = _int_in(*INT32)
_float = _float_in(-FLOAT32, FLOAT32)


def _choice(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.lower()

    return check


_ON_OFF = _choice("on", "off", "auto")

#: Most sequences llama.cpp runs at once (``LLAMA_MAX_SEQ``); more and it exits.
MAX_PARALLEL = 256
#: Largest context a request may ask for (tokens, 2^24); the host's memory bounds it
#: further (:meth:`corral.supervisor.host.ModelHost.refuse_flags`).
MAX_CTX = 2**24
#: Largest batch (tokens): larger ones only grow the compute buffers.
MAX_BATCH = 2**17
_CACHE_TYPES = _choice("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


@dataclass(frozen=True)
class Allowed:
    name: str
    """The canonical (long) spelling."""
    value: Callable[[str], str] | None
    """Normalizes the flag's value; None: a switch without a value."""
    bare: str | None = None
    """The value a valued flag means when given alone (``-fa`` -> ``on``)."""


_TABLE: list[tuple[tuple[str, ...], Callable[[str], str] | None, str | None]] = [
    # sampling
    (("--temp", "--temperature"), _float_in(0.0, 100.0), None),
    (("--top-k",), _int_in(0, INT32[1]), None),
    (("--top-p",), _float_in(0.0, 1.0), None),
    (("--min-p",), _float_in(0.0, 1.0), None),
    (("--typical", "--typical-p"), _float_in(0.0, 1.0), None),
    (("--repeat-penalty",), _float, None),
    (("--repeat-last-n",), _int_in(-1, INT32[1]), None),
    (("--presence-penalty",), _float, None),
    (("--frequency-penalty",), _float, None),
    (("--dry-multiplier",), _float, None),
    (("--dry-base",), _float, None),
    (("--dry-allowed-length",), _int_in(0, INT32[1]), None),
    (("--xtc-probability",), _float_in(0.0, 1.0), None),
    (("--xtc-threshold",), _float, None),
    (("--dynatemp-range",), _float, None),
    (("--dynatemp-exp",), _float, None),
    (("--mirostat",), _int_in(0, 2), None),
    (("--mirostat-lr",), _float, None),
    (("--mirostat-ent",), _float, None),
    (("-s", "--seed"), _int_in(-1, 2**32 - 1), None),
    (("-n", "--n-predict", "--predict"), _int_in(-2, INT32[1]), None),
    # context and batching
    (("-c", "--ctx-size"), _int_in(0, MAX_CTX), None),
    (("-np", "--parallel"), _int_in(1, MAX_PARALLEL), None),
    (("-b", "--batch-size"), _int_in(1, MAX_BATCH), None),
    (("-ub", "--ubatch-size"), _int_in(1, MAX_BATCH), None),
    (("--keep",), _int_in(-1, MAX_CTX), None),
    (("--rope-scaling",), _choice("none", "linear", "yarn"), None),
    (("--rope-freq-base",), _float, None),
    (("--rope-freq-scale",), _float, None),
    (("--yarn-orig-ctx",), _int_in(0, MAX_CTX), None),
    (("--yarn-ext-factor",), _float, None),
    (("--yarn-attn-factor",), _float, None),
    (("-fa", "--flash-attn"), _ON_OFF, "on"),
    (("--context-shift",), None, None),
    (("--no-context-shift",), None, None),
    (("--reasoning-budget",), _int_in(-1, INT32[1]), None),
    (("--reasoning-format",), _choice("none", "deepseek", "deepseek-legacy", "auto"), None),
    # cache
    (("-ctk", "--cache-type-k"), _CACHE_TYPES, None),
    (("-ctv", "--cache-type-v"), _CACHE_TYPES, None),
    (("--cache-reuse",), _int_in(0, MAX_CTX), None),
    (("-nkvo", "--no-kv-offload"), None, None),
    (("-kvu", "--kv-unified"), None, None),
    (("--swa-full",), None, None),
    (("-cram", "--cache-ram"), _int_in(-1, INT32[1]), None),
    (("--no-cache-prompt",), None, None),
]

ALLOWED: dict[str, Allowed] = {}
for _names, _value, _bare in _TABLE:
    _entry = Allowed(next(n for n in _names if n.startswith("--")), _value, _bare)
    for _name in _names:
        ALLOWED[_name] = _entry


def normalize(raw: str) -> tuple[str, ...]:
    """The canonical argument list for a header value; raises :class:`RequestFlagError`."""
    if len(raw) > MAX_LENGTH:
        raise RequestFlagError(f"flags header is longer than {MAX_LENGTH} characters")
    try:
        tokens = shlex.split(raw)
    except ValueError as exc:
        raise RequestFlagError(f"cannot split flags: {exc}") from None
    chosen: dict[str, str | None] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        name, has_inline, inline = token.partition("=")
        if not name.startswith("-"):
            raise RequestFlagError(f"expected a flag, got {token!r}")
        allowed = ALLOWED.get(name)
        if allowed is None:
            why = DENIED.get(name, "not on the per-request allow-list (sampling, cache, context)")
            raise RequestFlagError(f"flag {name} is not allowed per request: {why}")
        if allowed.value is None:
            if has_inline:
                raise RequestFlagError(f"flag {name} takes no value")
            chosen[allowed.name] = None
            continue
        if has_inline:
            value = inline
        elif index < len(tokens) and not _looks_like_flag(tokens[index]):
            value = tokens[index]
            index += 1
        elif allowed.bare is not None:
            value = allowed.bare
        else:
            raise RequestFlagError(f"flag {name} needs a value")
        try:
            chosen[allowed.name] = allowed.value(value)
        except ValueError as exc:
            why = str(exc)
            bounds = getattr(allowed.value, "range", None)
            if bounds is not None and "allowed" not in why:
                why = f"{why}; allowed: {bounds[0]:g} to {bounds[1]:g}"
            raise RequestFlagError(f"flag {name}: bad value {value!r} ({why})") from None
    out: list[str] = []
    for name in sorted(chosen):
        out.append(name)
        normalized = chosen[name]
        if normalized is not None:
            out.append(normalized)
    return tuple(out)


def _looks_like_flag(token: str) -> bool:
    if not token.startswith("-"):
        return False
    try:
        float(token)  # a negative number is a value
    except ValueError:
        return True
    return False
