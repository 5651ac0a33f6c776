"""Model names a client may send: ids, aliases, and alias patterns.

An alias holding a glob character (``*``, ``?`` or ``[``) is a pattern: ``gpt-*``
makes every name that starts with ``gpt-`` reach that model, as llama-swap's alias
lists and OpenAI-written clients need (they send ``gpt-4o-mini`` whatever serves
them). Matching is case-sensitive, like ids; an exact id or alias of any model wins
over every pattern, and the first model whose pattern matches wins among patterns.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

_GLOB = frozenset("*?[")


def is_pattern(alias: str) -> bool:
    """``alias`` is a glob pattern rather than a name."""
    return any(c in _GLOB for c in alias)


def pattern_matches(name: str, aliases: Iterable[str]) -> bool:
    """``name`` matches one of the patterns among ``aliases``."""
    return any(is_pattern(a) and fnmatchcase(name, a) for a in aliases)
