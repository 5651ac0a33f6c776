"""``corral serve``: a balancer and a local model host in one process.

This is the one-machine way to start corral, the job of llama-swap and llama-server's
router mode. The catalog holds the models: ``--model FILE`` (preloaded), the config
file's ``models`` table (manual), and GGUF files found under ``models_dirs`` (or, when
none are set, llama.cpp's and the Hugging Face hub's cache folders; rescanned when
they change). A request for a model with no instance makes the
:class:`~corral.supervisor.host.ModelHost` start one while the request waits in the
buffer; groups, ``max_instances``, memory and idle TTLs decide what is unloaded, and
nothing is unloaded with requests in flight.

Each llama-server gets a loopback port from the configured range and its model id as
its alias; a :class:`~corral.supervisor.managed.ManagedInstance` supervises it and its
agent reports it to the balancer in the same process over the same protocol a remote
agent uses, so what works here (restart, reconfigure, logs) works across hosts. If
llama-server exits unexpectedly it is started again with exponential backoff (1 s
doubling to 60 s) while requests wait in the buffer; after 5 failures in 5 minutes it
is reported ``failed`` with its exit code and last log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.balancer import Balancer, BoundAddresses
from corral.catalog.catalog import Catalog, watch
from corral.catalog.model import CatalogChange
from corral.config import ConfigError, ModelConfig, Settings, load_settings
from corral.supervisor.host import HostOptions, ModelHost
from corral.supervisor.managed import check_reserved

log = logging.getLogger(__name__)

#: Settings a config reload applies at once; others need a restart (and say so).
RELOADABLE = (
    "models",
    "groups",
    "llama_args",
    "model_ttl",
    "max_instances",
    "drain_timeout",
    "swap_hold",
    "replica_wait",
    "replica_idle",
    "memory_check",
)

#: Seconds between checks of the model folders for new or removed GGUF files.
CATALOG_WATCH_INTERVAL = 5.0


@dataclass
class ServeOptions:
    binary: Path | None
    """llama-server; None when none was found and every model runs a command template."""
    management_token: str
    cluster_token: str
    model: Path | None = None
    """One model to serve (and preload) besides the catalog's."""
    llama_args: list[str] = field(default_factory=list)
    """Extra llama-server arguments for ``model``."""
    models_dirs: list[Path] = field(default_factory=list)
    """Folders to search; empty: the settings', else the default caches (only when no
    ``model`` and no ``models`` table is given)."""
    log_dir: Path | None = None


def manual_models(settings: Settings, options: ServeOptions) -> dict[str, ModelConfig]:
    """The models the operator named: the config's ``models`` table, and ``--model``
    unless the table names it too."""
    manual = dict(settings.models)
    if options.model is not None:
        manual.setdefault(
            options.model.stem,
            ModelConfig(path=options.model, args=list(options.llama_args), preload=True),
        )
    return manual


def build_catalog(settings: Settings, options: ServeOptions) -> Catalog:
    manual = manual_models(settings, options)
    dirs = list(options.models_dirs or settings.models_dirs)
    if dirs:
        return Catalog(dirs, manual)
    if manual:
        return Catalog([], manual)  # the operator named the models: no cache scan
    return Catalog.from_settings(settings)


class LocalServe:
    """Balancer + model host on one event loop."""

    @staticmethod
    def check_args(llama_args: list[str]) -> None:
        """Refuse llama-server arguments corral must own (address, model, alias)."""
        check_reserved(llama_args)

    def __init__(
        self, settings: Settings, options: ServeOptions, catalog: Catalog | None = None
    ) -> None:
        self.check_args(options.llama_args)
        self.settings = settings
        self.options = options
        self.balancer = Balancer(
            settings,
            management_token=options.management_token,
            cluster_token=options.cluster_token,
            service="corral-serve",
        )
        self.catalog = catalog or build_catalog(settings, options)
        self.host: ModelHost | None = None
        self.config_file: Path | None = None
        """The config file ``POST /api/v1/config/reload`` re-reads."""
        self._watch_stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self) -> BoundAddresses:
        await asyncio.to_thread(self._first_scan)
        addresses = await self.balancer.start()
        scheduler = self.balancer.scheduler
        self.host = ModelHost(
            self.settings,
            self.catalog,
            scheduler,
            HostOptions(
                binary=self.options.binary,
                balancer=self.balancer.agent_address,
                cluster_token=self.options.cluster_token,
                tls=self.balancer.agent_tls,
            ),
        )
        scheduler.loader = self.host
        self.balancer.model_host = self.host  # remote model hosts may join it too
        scheduler.load_allowance = self.settings.startup_timeout + self.settings.drain_timeout
        self.balancer.management.host = self.host
        if self.config_file is not None:
            self.balancer.management.models_admin.reload = self.reload
        self.balancer.gateway.host = self.host
        self.host.start()
        if self.catalog.dirs:
            self._watch_task = asyncio.create_task(
                watch(
                    self.catalog,
                    interval=CATALOG_WATCH_INTERVAL,
                    on_change=self._catalog_changed,
                    stop=self._watch_stop,
                ),
                name="catalog-watch",
            )
        return addresses

    def _first_scan(self) -> None:
        if self.catalog.dirs and self.catalog.changed():  # a stat pass when just scanned
            self.catalog.rescan()
        for problem in self.catalog.problems:
            log.warning("catalog problem %s", problem)

    def _catalog_changed(self, change: CatalogChange) -> None:
        self.balancer.scheduler.emit(
            {
                "type": "catalog",
                "added": [m.id for m in change.added],
                "removed": [m.id for m in change.removed],
            }
        )

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; restart (drain, unload) only the models whose
        settings changed. Raises ValueError when the file is not valid (nothing changes)."""
        assert self.config_file is not None and self.host is not None
        try:
            new = await asyncio.to_thread(load_settings, self.config_file)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        old = self.settings
        # --model stays: it came from the command line, not from the file
        changed = set(self.catalog.set_manual(manual_models(new, self.options)))
        if old.llama_args != new.llama_args or old.model_ttl != new.model_ttl:
            changed.update(m.id for m in self.catalog.models)  # every model's settings
        for group in set(old.groups) | set(new.groups):
            if old.groups.get(group) != new.groups.get(group):
                changed.update(i for i, m in new.models.items() if m.group == group)
        for name in RELOADABLE:
            setattr(self.settings, name, getattr(new, name))
        restart_required = sorted(
            name
            for name in Settings.model_fields
            if name not in RELOADABLE and getattr(old, name) != getattr(new, name)
        )
        unloaded = []
        for model_id in sorted(changed):
            self.host.forget_failures(model_id)  # new settings: its old failures are history
            running = [h for h in self.host.running.values() if h.model.id == model_id]
            if running:
                await self.host.unload(model_id, reason="config changed")
                unloaded.append(model_id)
        log.info("config reloaded changed=%s unloaded=%s", sorted(changed), unloaded)
        return {
            "changed": sorted(changed),
            "unloaded": unloaded,
            "models": self.models,
            "restart_required": restart_required,
        }

    @property
    def models(self) -> list[str]:
        return [m.id for m in self.catalog.models]

    async def stop(self) -> None:
        """Drain the balancer, then stop every llama-server."""
        self._watch_stop.set()
        if self._watch_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self.balancer.stop()
        if self.host is not None:
            await self.host.stop()  # releases the port leases too
