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
- ``healthCheckTimeout`` -> ``startup_timeout``; ``startPort`` -> ``port_range``;
- any other ``cmd`` (vLLM, SGLang, a ``llama-server -hf`` download with no model file)
  becomes a command template (``cmd`` as a list, ``${PORT}`` -> ``${port}``), its
  ``checkEndpoint`` becomes ``health_path``; a llama-server run so serves every path
  (``paths: [/]``) with its ``--parallel`` as ``slots``.

Everything else is reported as a warning naming what has no equivalent (``proxy``
overrides, ``filters``, group ``exclusive`` across groups, ``useModelName``,
``cmdStop``, ``checkEndpoint: none`` ...), never silently dropped.
"""

from __future__ import annotations

import itertools
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
_PARALLEL_FLAGS = {"-np", "--parallel"}
#: model keys the conversion handles (the rest are warned about)
_HANDLED = {"cmd", "aliases", "ttl", "unlisted", "env", "proxy", "name", "description"}


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


def _llama_server(
    where: str, model_id: str, tokens: list[str], aliases: list[str], warnings: list[str]
) -> dict[str, Any] | None:
    """A llama-server ``cmd`` as corral's path/args/mmproj; None if it has no model file."""
    out: dict[str, Any] = {}
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
        return None
    if args:
        out["args"] = args
    return out


def _template(
    where: str, entry: dict[str, Any], tokens: list[str], llama: bool, warnings: list[str]
) -> dict[str, Any] | None:
    """Any other ``cmd`` as a command template; None (with a warning) if it cannot be."""
    if not any("${PORT}" in token for token in tokens):
        warnings.append(
            f"{where}: cmd never uses ${{PORT}}; corral must choose the server's port: skipped"
        )
        return None
    # ${PORT} is corral's ${port}; other ${...} left by unknown macros stay literal
    cmd = [token.replace("${", "$${").replace("$${PORT}", "${port}") for token in tokens]
    out: dict[str, Any] = {"cmd": cmd}
    check = entry.get("checkEndpoint")
    if isinstance(check, str) and check.startswith("/"):
        if check != "/health":
            out["health_path"] = check
    elif check is not None:
        warnings.append(
            f"{where}.checkEndpoint: {check!r}: corral always waits for a health path to "
            "answer 200; health_path stays /health"
        )
    if llama:
        # llama-server serves more than /v1/ (/completion, /infill ...), and --parallel
        # says how many requests it takes at once (corral cannot read /slots here)
        out["paths"] = ["/"]
        for flag, value in itertools.pairwise(tokens):
            if flag in _PARALLEL_FLAGS and value.isdigit() and int(value) > 0:
                out["slots"] = int(value)
        warnings.append(
            f"{where}: llama-server without a model file (-m) runs as a command template: "
            f"corral counts its slots itself ({out.get('slots', 4)}) and cannot read /slots"
        )
    return out


def _model(
    model_id: str, entry: dict[str, Any], macros: dict[str, str], warnings: list[str]
) -> dict[str, Any] | None:
    where = f"models.{model_id}"
    cmd = entry.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        warnings.append(f"{where}: no cmd; skipped")
        return None
    tokens = _split(_expand(cmd, {**macros, "MODEL_ID": model_id}, where, warnings))
    if not tokens:
        warnings.append(f"{where}: cmd runs nothing; skipped")
        return None
    aliases = [str(a) for a in entry.get("aliases") or []]
    llama = "llama-server" in Path(tokens[0]).name
    out = _llama_server(where, model_id, tokens, aliases, warnings) if llama else None
    template = out is None
    if template:
        out = _template(where, entry, tokens, llama, warnings)
        if out is None:
            return None
    assert out is not None
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
    handled = _HANDLED | ({"checkEndpoint"} if template else set())
    for key in sorted(set(entry) - handled):
        hint = ""
        if key == "useModelName" and template:
            hint = " (corral forwards the model name clients send; have the server accept it"
            hint += ", e.g. vLLM's --served-model-name)"
        warnings.append(f"{where}.{key}: no equivalent in corral: dropped{hint}")
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
