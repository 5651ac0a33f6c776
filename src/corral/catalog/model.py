"""What the catalog holds: models, the problems a scan met, and what a scan changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from corral.catalog.gguf_header import GGUFMetadata, WeightLayout
    from corral.config import ModelConfig

Source = Literal["auto", "manual"]


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One model clients can ask for, with what its files' headers say.

    ``path`` is what llama-server's ``--model`` gets: the file, or a split model's first
    shard. It is ``None`` only for a manual model whose config names no file.
    """

    id: str
    path: Path | None
    shards: tuple[Path, ...] = ()
    size_bytes: int = 0
    architecture: str | None = None
    context_length: int | None = None
    parameter_count: int | None = None
    file_type: int | None = None
    quantization: str | None = None
    has_chat_template: bool = False
    mmproj: Path | None = None
    source: Source = "auto"
    aliases: tuple[str, ...] = ()
    repo: str | None = None
    """Hugging Face repo (``ORG/NAME``) when found in a hub cache."""
    name: str | None = None
    """``general.name`` from the header."""
    config: ModelConfig | None = field(default=None, compare=False, repr=False)
    """The config entry of a manual model (its args, TTL, group ...)."""
    kv_bytes_per_token: int | None = None
    """f16 K+V cache bytes per token of context (memory estimates)."""
    weights: WeightLayout | None = field(default=None, compare=False, repr=False)
    """Tensor bytes per layer (GPU memory estimates; all shards together)."""

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request's ``model`` field may use for this model."""
        return (self.id, *self.aliases)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``corral models list --json`` and the management API."""
        return {
            "id": self.id,
            "path": str(self.path) if self.path else None,
            "shards": [str(p) for p in self.shards],
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "context_length": self.context_length,
            "parameter_count": self.parameter_count,
            "file_type": self.file_type,
            "quantization": self.quantization,
            "has_chat_template": self.has_chat_template,
            "mmproj": str(self.mmproj) if self.mmproj else None,
            "source": self.source,
            "aliases": list(self.aliases),
            "repo": self.repo,
            "name": self.name,
        }

    def to_model_config(self) -> ModelConfig:
        """The ``models:`` entry that serves this model (``corral models import --write``).

        The projector goes into ``args`` as ``--mmproj`` because the config has no field
        of its own for it yet.
        """
        from corral.config import ModelConfig

        if self.config is not None:
            return self.config
        args = ["--mmproj", str(self.mmproj)] if self.mmproj else []
        return ModelConfig(path=self.path, aliases=list(self.aliases), args=args)


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """A file (or folder) that yielded no model, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


Signature = frozenset[tuple[str, int, int]]
"""(path, size, mtime_ns) of every GGUF file under the folders: equal means unchanged."""

_CacheKey = tuple[str, int, int]
MetadataCache = dict[_CacheKey, "GGUFMetadata | str"]
"""(real path, size, mtime_ns) -> metadata or the reason it could not be read."""


@dataclass(slots=True)
class ScanResult:
    """Everything one pass over the folders found. Computing it touches no catalog state,
    so it can run in a worker thread; :meth:`Catalog.apply` installs it."""

    models: list[CatalogModel]
    problems: list[ScanProblem]
    signature: Signature
    cache: MetadataCache = field(default_factory=dict)


@dataclass(slots=True)
class CatalogChange:
    """What a rescan changed among the auto models (manual ones never change)."""

    added: list[CatalogModel] = field(default_factory=list)
    removed: list[CatalogModel] = field(default_factory=list)
    updated: list[CatalogModel] = field(default_factory=list)
    """Same id, different file or metadata (a re-downloaded or replaced model)."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated)
