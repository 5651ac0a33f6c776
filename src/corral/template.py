"""Command templates: how corral starts a model served by another OpenAI-compatible server.

A model whose config has ``cmd`` (vLLM, SGLang, a llama-server started some other way,
any program that answers HTTP on a port) is started from that argument list instead of
corral's llama-server command line. The list is never run through a shell: a string
``cmd`` is split once with :func:`shlex.split`, and each argument may hold placeholders
that corral fills in per start:

==================  ==================================================================
placeholder         value
==================  ==================================================================
``${host}``         the address the server must listen on (``127.0.0.1``)
``${port}``         the loopback port corral leased for this instance
``${model_id}``     the model's id in corral's ``models`` table
``${model_path}``   ``path`` as written (``~`` expanded): a file, a folder or whatever
                    the server takes as its model, e.g. a Hugging Face repo id for vLLM;
                    it need not exist on disk
``${mmproj}``       ``mmproj`` as written
==================  ==================================================================

A literal ``${`` is written ``$${``. Any other ``${name}`` is a configuration error,
found when the file is loaded. Nothing else is expanded: no ``$VAR``, no ``~`` outside
``${model_path}``, no globbing; environment goes in the model's ``env``.

This module is pure (no corral imports), so configuration validation can use it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = [
    "PLACEHOLDERS",
    "TemplateError",
    "placeholders",
    "split_command",
    "substitute",
    "unknown_placeholders",
]

PLACEHOLDERS: Final = ("host", "port", "model_id", "model_path", "mmproj")
"""Every name a ``${...}`` placeholder may use."""

_TOKEN: Final = re.compile(r"\$\$\{|\$\{([^}]*)\}")


class TemplateError(ValueError):
    """A command template that cannot be used; the message says what to fix."""


def split_command(value: str | Sequence[str]) -> list[str]:
    """A ``cmd`` as an argument list: a string is split like a POSIX shell would split
    words (quotes, backslashes), but nothing is expanded and no shell runs it."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise TemplateError(f"cannot split the command: {exc}") from None
    return [str(part) for part in value]


def placeholders(argument: str) -> list[str]:
    """The placeholder names ``argument`` uses, in order (``$${`` escapes excluded)."""
    return [m[1] for m in _TOKEN.finditer(argument) if m[0] != "$${"]


def unknown_placeholders(argument: str) -> list[str]:
    """Placeholder names in ``argument`` corral does not know."""
    return [name for name in placeholders(argument) if name not in PLACEHOLDERS]


def substitute(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """``template`` with every placeholder replaced by its value.

    Raises :class:`TemplateError` for an unknown placeholder or one without a value
    (``${mmproj}`` for a model that has no projector).
    """

    def fill(match: re.Match[str]) -> str:
        if match[0] == "$${":
            return "${"
        name = match[1]
        if name not in PLACEHOLDERS:
            known = ", ".join("${" + p + "}" for p in PLACEHOLDERS)
            raise TemplateError(f"unknown placeholder ${{{name}}} (known: {known})")
        value = values.get(name)
        if value is None:
            raise TemplateError(f"${{{name}}} has no value for this model")
        return value

    return [_TOKEN.sub(fill, argument) for argument in template]
