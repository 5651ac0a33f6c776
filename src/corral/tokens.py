"""Secrets for the management API and the agent protocol.

corral never runs its management API open. When no token is configured and the
management address is loopback, a token is generated once, stored with mode 0600 in
corral's state folder, and reused on later starts; corral prints where to read it,
never the token itself. On any other address a missing token is an error.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from pathlib import Path


class TokenError(RuntimeError):
    """A required secret is missing; the message says how to provide it."""


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``CORRAL_STATE_DIR``, else ``$XDG_STATE_HOME/corral``, else ``~/.local/state/corral``."""
    environ = os.environ if environ is None else environ
    if environ.get("CORRAL_STATE_DIR"):
        return Path(environ["CORRAL_STATE_DIR"])
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "corral"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return value or None


def generated_token(path: Path) -> tuple[str, bool]:
    """The token stored at ``path``, creating it (mode 0600) if absent.

    Returns ``(token, created)``.
    """
    existing = read_token_file(path)
    if existing:
        return existing, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token, True


def management_token_file(environ: Mapping[str, str] | None = None) -> Path:
    return state_dir(environ) / "management-token"


def cluster_token_file(environ: Mapping[str, str] | None = None) -> Path:
    return state_dir(environ) / "cluster-token"
