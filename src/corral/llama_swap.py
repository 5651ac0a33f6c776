"""``corral config import-llama-swap FILE``: turn a llama-swap config into corral's.

What converts:

- ``macros`` (``${name}``, macros using macros) are expanded in ``cmd``;
- each model's ``cmd`` running llama-server: ``-m/--model`` becomes ``path``,
  ``--alias`` joins ``aliases``, ``--mmproj`` becomes ``mmproj``, ``--host`` and
  ``--port ${PORT}`` are dropped (corral assigns them), the rest stays in ``args``;
- ``aliases``, ``ttl``, ``unlisted``, ``env`` (``KEY=VALUE`` list);
- ``groups``: ``swap: true`` (the default) -> ``exclusive: true``; ``persistent``;
  ``members`` -> each member's ``group``;
- ``hooks.on_startup.preload`` -> ``preload: true``;
- ``healthCheckTimeout`` -> ``startup_timeout``; ``startPort`` -> ``port_range``.

Everything else is reported as a warning naming what has no equivalent (a non
llama-server ``cmd``, ``proxy`` overrides, ``filters``, group ``exclusive`` across
groups, ``useModelName``, ``cmdStop``, ``checkEndpoint`` ...), never silently dropped.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import GroupConfig, ModelConfig, Settings

_MACRO = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
#: llama-server flags corral sets itself: dropped with their value
_DROPPED = {"--port", "--host"}
_MODEL_FLAGS = {"-m", "--model"}
_ALIAS_FLAGS = {"-a", "--alias"}
_IGNORED_TOP = {"logLevel", "logRequests", "metricsMaxInMemory", "includeAliasesInList"}


@dataclass
class Converted:
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _expand(text: str, macros: dict[str, str], where: str, warnings: list[str]) -> str:
    for _ in range(10):  # macros may use macros; ten levels is plenty
        changed = _MACRO.sub(
            lambda m: macros[m[1]] if m[1] in macros else m[0],
            text,
        )
        if changed == text:
            break
        text = changed
    leftover = sorted(set(_MACRO.findall(text)) - {"PORT", "MODEL_ID"})
    if leftover:
        warnings.append(f"{where}: unknown macro(s) {', '.join(leftover)} left as they are")
    return text


def _split(cmd: str) -> list[str]:
    lines = []
    for line in cmd.replace("\\\n", " ").splitlines():
        if line.strip().startswith("#"):
            continue  # llama-swap allows comment lines in cmd
        lines.append(line)
    return shlex.split(" ".join(lines))


def _model(
    model_id: str, entry: dict[str, Any], macros: dict[str, str], warnings: list[str]
) -> dict[str, Any] | None:
    where = f"models.{model_id}"
    cmd = entry.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        warnings.append(f"{where}: no cmd; skipped")
        return None
    tokens = _split(_expand(cmd, {**macros, "MODEL_ID": model_id}, where, warnings))
    if not tokens or "llama-server" not in Path(tokens[0]).name:
        warnings.append(
            f"{where}: cmd runs {tokens[0] if tokens else '(nothing)'!r}, not llama-server; "
            "corral only starts llama-server so far: skipped"
        )
        return None
    out: dict[str, Any] = {}
    aliases = [str(a) for a in entry.get("aliases") or []]
    args: list[str] = []
    index = 1
    while index < len(tokens):
        token = tokens[index]
        name, has_value, inline = token.partition("=")
        value: str | None = inline if has_value else None
        takes = name in _DROPPED | _MODEL_FLAGS | _ALIAS_FLAGS | {"--mmproj"}
        if takes and value is None:
            value = tokens[index + 1] if index + 1 < len(tokens) else ""
            index += 1
        index += 1
        if name in _DROPPED:
            continue
        if name in _MODEL_FLAGS:
            out["path"] = value
        elif name in _ALIAS_FLAGS:
            aliases += [a for a in (value or "").split(",") if a and a != model_id]
        elif name == "--mmproj":
            out["mmproj"] = value
        elif "${PORT}" in token:
            warnings.append(f"{where}: {token!r} uses ${{PORT}} outside --port: dropped")
        else:
            args.append(token)
    if "path" not in out:
        warnings.append(f"{where}: cmd has no -m/--model (a -hf download?): skipped")
        return None
    if args:
        out["args"] = args
    if aliases:
        out["aliases"] = list(dict.fromkeys(aliases))
    if entry.get("ttl"):
        out["ttl"] = entry["ttl"]
    if entry.get("unlisted"):
        out["unlisted"] = True
    env = entry.get("env") or []
    if env:
        pairs = {}
        for item in env:
            key, sep, value = str(item).partition("=")
            if not sep:
                warnings.append(f"{where}.env: {item!r} is not KEY=VALUE: dropped")
                continue
            pairs[key] = value
        out["env"] = pairs
    for key in sorted(set(entry) - {"cmd", "aliases", "ttl", "unlisted", "env", "proxy"}):
        if key in ("name", "description"):
            continue
        warnings.append(f"{where}.{key}: no equivalent in corral: dropped")
    proxy = entry.get("proxy")
    if proxy and "${PORT}" not in str(proxy):
        warnings.append(f"{where}.proxy: {proxy!r}: corral proxies to the port it assigns")
    return out


def convert(data: dict[str, Any]) -> Converted:
    """Convert a parsed llama-swap config; the result validates as corral's settings."""
    warnings: list[str] = []
    macros = {str(k): str(v).strip() for k, v in (data.get("macros") or {}).items()}
    config: dict[str, Any] = {}
    if "healthCheckTimeout" in data:
        config["startup_timeout"] = float(data["healthCheckTimeout"])
    if "startPort" in data:
        start = int(data["startPort"])
        config["port_range"] = f"{start}-{min(start + 199, 65535)}"
    models: dict[str, dict[str, Any]] = {}
    for model_id, entry in (data.get("models") or {}).items():
        converted = _model(str(model_id), dict(entry or {}), macros, warnings)
        if converted is not None:
            models[str(model_id)] = converted
    groups: dict[str, dict[str, Any]] = {}
    for name, group in (data.get("groups") or {}).items():
        group = dict(group or {})
        groups[str(name)] = {
            "exclusive": bool(group.get("swap", True)),
            "persistent": bool(group.get("persistent", False)),
        }
        if group.get("exclusive", True):
            warnings.append(
                f"groups.{name}.exclusive: llama-swap unloads other groups when a member "
                "loads; corral evicts only to make room (max_instances, memory)"
            )
        for member in group.get("members") or []:
            if member not in models:
                warnings.append(f"groups.{name}: member {member!r} is not a converted model")
                continue
            if "group" in models[member]:
                warnings.append(
                    f"groups.{name}: {member!r} is already in group "
                    f"{models[member]['group']!r}; corral allows one group per model"
                )
                continue
            models[member]["group"] = str(name)
    hooks = (data.get("hooks") or {}).get("on_startup") or {}
    for model_id in hooks.get("preload") or []:
        if model_id in models:
            models[model_id]["preload"] = True
        else:
            warnings.append(f"hooks.on_startup.preload: {model_id!r} is not a converted model")
    known = {"macros", "models", "groups", "hooks", "healthCheckTimeout", "startPort"}
    for key in sorted(set(data) - known - _IGNORED_TOP):
        warnings.append(f"{key}: no equivalent in corral: dropped")
    if models:
        config["models"] = models
    if groups:
        config["groups"] = groups
    Settings.model_validate(
        {
            **config,
            "models": {k: ModelConfig.model_validate(v) for k, v in models.items()},
            "groups": {k: GroupConfig.model_validate(v) for k, v in groups.items()},
        }
    )
    return Converted(config, warnings)
