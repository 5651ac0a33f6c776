"""What the edges (the gateway, the management API, the dashboard) know of a model
host: its interface, its model states and its refusal, without importing it.

The host on one machine is :class:`corral.supervisor.host.ModelHost`; what it decides
(what to evict, when to start, when an idle model goes) is the pure planner in
:mod:`corral.supervisor.planner`. The edges hold a :class:`Host`, so a host that
places models on other machines can take its place behind the same seam.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types only: this module imports nothing of corral's at run time
    from corral.catalog.catalog import Catalog
    from corral.config import ModelConfig


class ModelState(enum.StrEnum):
    """Where one model (one pool: a model, or a model with per-request flags) stands
    on a host. The values are what ``GET /api/v1/models`` and ``/v1/models`` show::

                    request or load                  its agent reports it usable
        UNLOADED ──────────────────▶ LOADING ───────────────────────────────────▶ LOADED
            ▲                          │  (queued, making room, starting)            │
            │   failed to start or     │                                             │
            ├──────────────────────────┘                                             │
            │   refused (waiters get the reason)        idle TTL, evicted to make    │
            │                                           room, operator, reload       │
            │          stopped                                                       ▼
            └──────────────────────────────────────────────────────────────── UNLOADING
                                    drain timed out (requests in flight): back to LOADED

    A model is never stopped with requests in flight: UNLOADING drains it first, and a
    drain that does not finish within ``drain_timeout`` calls the unload off. Requests
    that arrive while it unloads wait, and load it again once it is gone.
    """

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class LoadRefused(Exception):
    """A model cannot be loaded here; the message says why and what to change.

    ``detail`` is the longer story for the operator (the server's last log lines): the
    management API shows it; a client gets only the message."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


class Host(Protocol):
    """The model host as the edges use it (and the scheduler, through its loader)."""

    catalog: Catalog
    last_error: dict[str, str]
    """Why each model's last load failed (cleared by its next attempt)."""

    @property
    def max_instances(self) -> int:
        """How many instances the host runs at most."""
        ...

    @property
    def drain_timeout(self) -> float:
        """Seconds an unload waits for requests in flight before it is called off."""
        ...

    @property
    def loading(self) -> str | None:
        """The model whose load is under way now (making room or starting)."""
        ...

    def resolve(self, name: str) -> str | None:
        """The model (pool) a name stands for: an id, an alias or a flagged pool."""
        ...

    def listed(self) -> list[str]:
        """The models ``/v1/models`` lists."""
        ...

    def state(self, key: str) -> ModelState:
        """Where ``key`` stands now."""
        ...

    def queued(self, key: str) -> bool:
        """Whether a load of ``key`` waits for its turn."""
        ...

    def model_config(self, key: str) -> ModelConfig | None:
        """The settings of the model ``key`` names, or None for an unknown one."""
        ...

    def flagged_key(self, model: str, flags: tuple[str, ...]) -> str:
        """The pool of ``model`` run with normalized per-request ``flags``."""
        ...

    def refuse_flags(self, key: str) -> str | None:
        """Why the flagged pool ``key`` must not start (a client's 400), or None."""
        ...

    def load(self, model: str, host: str | None = None) -> str:
        """Load ``model`` with nobody waiting (on ``host`` when given); its key.
        Raises :class:`LoadRefused`."""
        ...

    def hosts(self) -> list[dict[str, Any]]:
        """Every machine models run on, with its room and servers."""
        ...

    async def wait_loaded(self, key: str, timeout: float) -> bool:  # noqa: ASYNC109
        """True once ``key`` serves; False when its load failed or after ``timeout``."""
        ...

    async def unload(self, model: str, *, reason: str = "operator") -> bool:
        """Drain and stop ``model``; False if it did not drain (it keeps serving)."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """Every catalog model with its state and settings."""
        ...
