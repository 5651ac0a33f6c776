"""The catalog: manual models from the config plus auto models found in folders (see
:mod:`corral.catalog.discovery` for the rules), and the watcher that keeps it current.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from corral.catalog.discovery import manual_model, scan_folders
from corral.catalog.folders import default_models_dirs, folder_signature
from corral.catalog.model import (
    CatalogChange,
    CatalogModel,
    MetadataCache,
    ScanProblem,
    ScanResult,
    Signature,
)
from corral.catalog.names import pattern_matches

if TYPE_CHECKING:
    from corral.config import ModelConfig, Settings

logger = logging.getLogger(__name__)


class Catalog:
    """Manual models from the config plus auto models found in folders.

    Not thread-safe by design: like all fleet state it lives on the event loop. The slow
    part, :meth:`scan_folders`, reads no mutable state but the metadata cache's current
    dict and changes none, so :func:`watch` runs it in a worker thread and applies the
    result on the loop with :meth:`apply`.
    """

    def __init__(
        self,
        dirs: Iterable[Path],
        manual: Mapping[str, ModelConfig] | None = None,
        *,
        missing_ok: bool = False,
    ) -> None:
        self.dirs: list[Path] = [Path(d).expanduser() for d in dirs]
        self.missing_ok = missing_ok
        """Whether a folder that does not exist is fine (the default caches) or a problem."""
        self._manual: dict[str, CatalogModel] = {}
        self._manual_problems: list[ScanProblem] = []
        for model_id, config in (manual or {}).items():
            model, problem = manual_model(model_id, config)
            self._manual[model_id] = model
            if problem is not None:
                self._manual_problems.append(problem)
        self._auto: dict[str, CatalogModel] = {}
        self._scan_problems: list[ScanProblem] = []
        self._signature: Signature | None = None
        self._cache: MetadataCache = {}

    def set_manual(self, manual: Mapping[str, ModelConfig]) -> list[str]:
        """Replace the manual models (a config reload); the ids added, removed or whose
        entry changed. Auto models stay until the next scan."""
        old = {i: m.config for i, m in self._manual.items()}
        self._manual, self._manual_problems = {}, []
        for model_id, config in manual.items():
            model, problem = manual_model(model_id, config)
            self._manual[model_id] = model
            if problem is not None:
                self._manual_problems.append(problem)
        ids = set(old) | set(manual)
        return sorted(i for i in ids if old.get(i) != manual.get(i))

    @classmethod
    def from_settings(cls, settings: Settings, dirs: Sequence[Path] | None = None) -> Catalog:
        """``dirs``, else the settings' ``models_dirs``, else the default caches (which
        may not exist yet: a watcher picks them up when they appear)."""
        chosen = list(dirs or settings.models_dirs)
        if chosen:
            return cls(chosen, settings.models)
        return cls(default_models_dirs(), settings.models, missing_ok=True)

    @property
    def models(self) -> list[CatalogModel]:
        """Every model, manual and auto, sorted by id."""
        return sorted([*self._manual.values(), *self._auto.values()], key=lambda m: m.id)

    @property
    def problems(self) -> list[ScanProblem]:
        """Why files (or manual entries) yield no usable model, as of the last scan."""
        return [*self._manual_problems, *self._scan_problems]

    def get(self, name: str) -> CatalogModel | None:
        """The model a request's ``model`` names, by id or alias."""
        found = self._manual.get(name) or self._auto.get(name)
        if found is not None:
            return found
        exact = next((m for m in self.models if name in m.aliases), None)
        if exact is not None:
            return exact
        return next((m for m in self.models if pattern_matches(name, m.aliases)), None)

    def scan_folders(self) -> ScanResult:
        """Scan the folders (slow: stats every file, reads new headers); changes nothing."""
        taken = {n for m in self._manual.values() for n in m.names}
        exclude = [p for m in self._manual.values() for p in m.shards]
        previous = {m.path: m.id for m in self._auto.values() if m.path is not None}
        return scan_folders(
            self.dirs,
            exclude=exclude,
            taken=taken,
            previous_ids=previous,
            cache=self._cache,
            missing_ok=self.missing_ok,
        )

    def apply(self, result: ScanResult) -> CatalogChange:
        """Replace the auto models with a scan's; manual models are left as they are."""
        new = {m.id: m for m in result.models}
        change = CatalogChange(
            added=[m for i, m in new.items() if i not in self._auto],
            removed=[m for i, m in self._auto.items() if i not in new],
            updated=[m for i, m in new.items() if i in self._auto and self._auto[i] != m],
        )
        self._auto = new
        self._scan_problems = list(result.problems)
        self._signature = result.signature
        self._cache = result.cache
        for m in change.added:
            logger.info("catalog_added id=%s path=%s", m.id, m.path)
        for m in change.removed:
            logger.info("catalog_removed id=%s path=%s", m.id, m.path)
        for m in change.updated:
            logger.info("catalog_updated id=%s path=%s", m.id, m.path)
        return change

    def rescan(self) -> CatalogChange:
        """Scan now and apply: new files are added, vanished ones removed."""
        return self.apply(self.scan_folders())

    def changed(self) -> bool:
        """Whether the folders' GGUF files differ from the last scan (stat only)."""
        return self._signature is None or folder_signature(self.dirs) != self._signature


async def watch(
    catalog: Catalog,
    *,
    interval: float = 5.0,
    on_change: Callable[[CatalogChange], object] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Rescan whenever the folders change, checking every ``interval`` seconds.

    Polling a stat signature rather than inotify works the same on every platform and
    on network file systems, and costs one ``stat`` per GGUF file per interval. The
    blocking work runs in a thread; the catalog is changed only here, on the loop.
    """
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            if await asyncio.to_thread(catalog.changed):
                change = catalog.apply(await asyncio.to_thread(catalog.scan_folders))
                if change and on_change is not None:
                    on_change(change)
        except Exception:  # a watcher that dies silently is worse than one that logs
            logger.exception("catalog_watch_failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
