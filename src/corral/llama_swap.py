"""``corral config import-llama-swap FILE``: turn a llama-swap config into corral's.

What converts (llama-swap's current layout, v250, and the older one):

- ``macros`` (``${name}``, macros using macros, a model's own ``macros`` over the
  global ones, ``${MODEL_ID}``) are expanded wherever a converted value uses them, a
  value that is one macro keeping the macro's type; ``${env.NAME}`` is read from the
  environment of the import, as llama-swap reads it at load (one not set stays as it
  is, with a warning);
- each model's ``cmd`` running llama-server: ``-m/--model`` becomes ``path``,
  ``--alias`` joins ``aliases``, ``--mmproj`` becomes ``mmproj``, ``--host`` and
  ``--port ${PORT}`` are dropped (corral assigns them), the rest stays in ``args``;
- ``aliases``, ``unlisted``, ``env`` (``KEY=VALUE`` list); ``ttl`` (``0``, never, and
  ``-1``, the global one, leave it unset); ``sendLoadingState`` -> ``loading_notices``;
  ``unloadTimeout`` -> ``stop_grace`` (``0``, the global one, leaves it unset);
  ``useModelName`` -> ``use_model_name``;
- ``filters``: ``stripParams`` (or the older ``strip_params``; comma-separated) ->
  ``strip_params``, ``setParams`` -> ``set_params``, ``setParamsByID`` ->
  ``set_params_by_name`` (each name also becomes an alias, as in llama-swap);
- ``groups``, or ``routing.router.settings.groups`` with ``routing.router.use: group``:
  ``swap: true`` (the default) -> ``exclusive: true``; ``persistent``; ``members`` ->
  each member's ``group``;
- ``hooks.on_startup.preload`` -> ``preload: true``;
- ``healthCheckTimeout`` -> ``startup_timeout``; ``startPort`` -> ``port_range``;
  ``sendLoadingState`` -> ``loading_notices``; ``globalTTL`` -> ``model_ttl`` (``0``,
  never, leaves it unset); ``unloadTimeout`` -> ``stop_grace``; ``apiKeys`` ->
  ``api_keys`` (an ``${env.NAME}`` one that is not set is skipped: set
  ``CORRAL_API_KEYS`` for corral instead);
- any other ``cmd`` (vLLM, SGLang, a ``llama-server -hf`` download with no model file)
  becomes a command template (``cmd`` as a list, ``${PORT}`` -> ``${port}``), its
  ``checkEndpoint`` becomes ``health_path``; a llama-server run so serves every path
  (``paths: [/]``) with its ``--parallel`` as ``slots``.

Everything else is reported as a warning naming what has no equivalent and, where
corral does it another way, what it does (``concurrencyLimit``, the ``matrix`` router,
scheduler priorities, group ``exclusive`` across groups, ``cmdStop``, ``timeouts``,
``peers``, ``profiles``, ``selectors`` ...), never silently dropped. Only display and
logging details (``name``, ``description``, ``logLevel`` ...) go without a word.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from collections.abc import Mapping
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
_HANDLED = {
    "cmd", "aliases", "ttl", "unlisted", "env", "proxy", "name", "description", "macros",
    "sendLoadingState", "unloadTimeout", "useModelName", "filters", "concurrencyLimit",
    "checkEndpoint",
}  # fmt: skip
#: what corral does instead, for keys with no equivalent
_HINTS = {
    "cmdStop": "corral stops a server itself: SIGTERM, then SIGKILL after stop_grace",
    "timeouts": "corral's upstream timeouts are global: upstream_connect_timeout, "
    "upstream_first_byte_timeout, upstream_idle_timeout",
    "logToStdout": "corral writes each llama-server's output to a file in log_dir",
}
_EVICTION = (
    "corral evicts by groups (exclusive, persistent), least recently used first, and to "
    "free memory (max_instances, memory_check)"
)
_FILTER_KEYS = {"stripParams", "strip_params", "setParams", "setParamsByID"}


@dataclass
class Converted:
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _macro_text(value: Any) -> str:
    """A macro value as llama-swap writes it into a string (Go's ``%v``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value).strip() if isinstance(value, str) else str(value)


@dataclass
class _Scope:
    """The macros a value may use (the global ones, a model's own over them) and the
    environment ``${env.NAME}`` reads; unresolved ones are warned about."""

    macros: dict[str, Any]
    environ: Mapping[str, str]
    warnings: list[str]

    def model(self, model_id: str, own: dict[str, Any]) -> _Scope:
        return _Scope({**self.macros, **own, "MODEL_ID": model_id}, self.environ, self.warnings)

    def _lookup(self, name: str) -> str | None:
        if name.startswith("env."):
            return self.environ.get(name[4:])
        return _macro_text(self.macros[name]) if name in self.macros else None

    def _replace(self, match: re.Match[str]) -> str:
        value = self._lookup(match[1])
        return match[0] if value is None else value

    def text(self, value: Any, where: str) -> str:
        text = value if isinstance(value, str) else _macro_text(value)
        for _ in range(10):  # macros may use macros; ten levels is plenty
            changed = _MACRO.sub(self._replace, text)
            if changed == text:
                break
            text = changed
        leftover = sorted(set(_MACRO.findall(text)) - {"PORT"})
        unset = [name for name in leftover if name.startswith("env.")]
        unknown = [name for name in leftover if not name.startswith("env.")]
        if unset:
            names = ", ".join("${" + name + "}" for name in unset)
            self.warnings.append(
                f"{where}: {names} not set in the environment: left as it is (llama-swap "
                "reads it at load; set it and import again)"
            )
        if unknown:
            self.warnings.append(f"{where}: unknown macro(s) {', '.join(unknown)} left as they are")
        return text

    def value(self, value: Any, where: str) -> Any:
        """``value`` with its macros expanded; a string that is one macro takes its type."""
        if isinstance(value, str):
            whole = _MACRO.fullmatch(value.strip())
            if whole and whole[1] in self.macros and not isinstance(self.macros[whole[1]], str):
                return self.macros[whole[1]]
            return self.text(value, where)
        if isinstance(value, dict):
            return {k: self.value(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value


def _number(value: Any, where: str, warnings: list[str]) -> int | float | None:
    """A llama-swap number (macros already expanded); None, with a warning, if not one."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        warnings.append(f"{where}: {value!r} is not a number: dropped")
        return None
    return int(number) if number.is_integer() else number


def _flag(value: Any, where: str, warnings: list[str]) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    warnings.append(f"{where}: {value!r} is not true or false: dropped")
    return None


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
    where: str, check: Any, tokens: list[str], llama: bool, warnings: list[str]
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


def _without_model(params: dict[str, Any], where: str, warnings: list[str]) -> dict[str, Any]:
    if "model" in params:
        warnings.append(
            f"{where}: `model` is never set by a filter (it routes the request; llama-swap "
            "ignores it too; the name sent upstream is useModelName): left out"
        )
    return {str(k): v for k, v in params.items() if k != "model"}


def _filters(raw: Any, scope: _Scope, where: str) -> dict[str, Any] | None:
    """llama-swap's ``filters`` as corral's (ModelFilters)."""
    warnings = scope.warnings
    if not isinstance(raw, dict):
        warnings.append(f"{where}: {type(raw).__name__} is not a mapping: dropped")
        return None
    out: dict[str, Any] = {}
    # llama-swap still reads the older strip_params when stripParams is empty
    key = "stripParams" if raw.get("stripParams") else "strip_params"
    if raw.get(key):
        names = [p.strip() for p in scope.text(raw[key], f"{where}.{key}").split(",")]
        names = list(dict.fromkeys(p for p in names if p))
        if "model" in names:
            warnings.append(
                f"{where}.{key}: `model` is never stripped (it routes the request; "
                "llama-swap ignores it too): left out"
            )
        if names := [p for p in names if p != "model"]:
            out["strip_params"] = names
    set_params = raw.get("setParams")
    if isinstance(set_params, dict):
        params = scope.value(set_params, f"{where}.setParams")
        if params := _without_model(params, f"{where}.setParams", warnings):
            out["set_params"] = params
    elif set_params:
        warnings.append(f"{where}.setParams: not a mapping: dropped")
    by_id = raw.get("setParamsByID")
    if isinstance(by_id, dict):
        named: dict[str, dict[str, Any]] = {}
        for raw_name, params in by_id.items():
            name = scope.text(str(raw_name), f"{where}.setParamsByID")
            at = f"{where}.setParamsByID.{name}"
            if params is None:
                params = {}  # the name still becomes an alias
            if not isinstance(params, dict):
                warnings.append(f"{at}: not a mapping: dropped")
                continue
            named[name] = _without_model(scope.value(params, at), at, warnings)
        if named:
            out["set_params_by_name"] = named
    elif by_id:
        warnings.append(f"{where}.setParamsByID: not a mapping: dropped")
    for other in sorted(set(map(str, raw)) - _FILTER_KEYS):
        warnings.append(f"{where}.{other}: no equivalent in corral: dropped")
    return out or None


def _model(
    model_id: str, entry: dict[str, Any], parent: _Scope, global_ttl: float | None
) -> dict[str, Any] | None:
    where = f"models.{model_id}"
    warnings = parent.warnings
    own = entry.get("macros") or {}
    if not isinstance(own, dict):
        warnings.append(f"{where}.macros: not a mapping: dropped")
        own = {}
    scope = parent.model(model_id, {str(k): v for k, v in own.items()})
    cmd = entry.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        warnings.append(f"{where}: no cmd; skipped")
        return None
    tokens = _split(scope.text(cmd, where))
    if not tokens:
        warnings.append(f"{where}: cmd runs nothing; skipped")
        return None
    aliases = [scope.text(a, f"{where}.aliases") for a in entry.get("aliases") or []]
    llama = "llama-server" in Path(tokens[0]).name
    out = _llama_server(where, model_id, tokens, aliases, warnings) if llama else None
    check = entry.get("checkEndpoint")
    if check is not None:
        check = scope.text(check, f"{where}.checkEndpoint")
    template = out is None
    if template:
        out = _template(where, check, tokens, llama, warnings)
        if out is None:
            return None
    elif check is not None and check != "/health":
        warnings.append(
            f"{where}.checkEndpoint: {check!r}: corral waits for llama-server's own /health: "
            "dropped"
        )
    assert out is not None
    if aliases:
        out["aliases"] = list(dict.fromkeys(aliases))

    def number(key: str) -> int | float | None:
        if key not in entry:
            return None
        return _number(scope.value(entry[key], f"{where}.{key}"), f"{where}.{key}", warnings)

    def flag(key: str) -> bool | None:
        if entry.get(key) is None:
            return None
        return _flag(scope.value(entry[key], f"{where}.{key}"), f"{where}.{key}", warnings)

    ttl = number("ttl")  # -1 (the default): globalTTL; 0: never
    if ttl is not None and ttl > 0:
        out["ttl"] = ttl
    elif ttl == 0 and global_ttl:
        warnings.append(
            f"{where}.ttl: 0 (never unload) has no per-model equivalent while model_ttl is "
            f"set ({global_ttl:g} s, from globalTTL): to keep it loaded, drop model_ttl and "
            "give the other models their own ttl"
        )
    if flag("unlisted"):
        out["unlisted"] = True
    env = entry.get("env") or []
    if env:
        pairs = {}
        for item in env:
            key, sep, value = scope.text(item, f"{where}.env").partition("=")
            if not sep:
                warnings.append(f"{where}.env: {item!r} is not KEY=VALUE: dropped")
                continue
            pairs[key] = value
        out["env"] = pairs
    notices = flag("sendLoadingState")
    if notices is not None:
        out["loading_notices"] = notices
    grace = number("unloadTimeout")  # 0: the global unloadTimeout
    if grace is not None and grace > 0:
        out["stop_grace"] = grace
    if entry.get("useModelName"):
        if name := scope.text(entry["useModelName"], f"{where}.useModelName").strip():
            out["use_model_name"] = name
    if entry.get("filters"):
        filters = _filters(entry["filters"], scope, f"{where}.filters")
        if filters:
            out["filters"] = filters
    limit = number("concurrencyLimit")
    if limit is not None and limit > 0:
        fewer = "lower its slots" if template else "lower its --parallel"
        warnings.append(
            f"{where}.concurrencyLimit: {limit:g}: corral has no per-model request cap; it "
            "admits as many requests at once as the instance has slots (llama-server "
            "--parallel) and buffers up to max_buffered_requests more (then 429): for "
            f"fewer at once, {fewer}"
        )
    for key in sorted(set(map(str, entry)) - _HANDLED):
        hint = f" ({_HINTS[key]})" if key in _HINTS else ""
        warnings.append(f"{where}.{key}: no equivalent in corral: dropped{hint}")
    proxy = entry.get("proxy")
    if proxy:
        proxy = scope.text(proxy, f"{where}.proxy")
        if "${PORT}" not in proxy:
            warnings.append(f"{where}.proxy: {proxy!r}: corral proxies to the port it assigns")
    return out


def _api_keys(raw: Any, scope: _Scope) -> list[str]:
    """``apiKeys`` as ``api_keys``; a key's value never appears in a warning."""
    warnings = scope.warnings
    if not isinstance(raw, list):
        if raw:
            warnings.append("apiKeys: not a list: dropped")
        return []
    keys: list[str] = []
    for index, item in enumerate(raw):
        where = f"apiKeys[{index}]"
        text = item if isinstance(item, str) else _macro_text(item)
        # expanded quietly: a key still holding a macro is skipped, with its own warning
        key = _Scope(scope.macros, scope.environ, []).text(text, where).strip()
        left = sorted(set(_MACRO.findall(key)))
        if left:
            unset = [name[4:] for name in left if name.startswith("env.")]
            unknown = [name for name in left if not name.startswith("env.")]
            why = []
            if unset:
                why.append(f"environment variable {', '.join(unset)} is not set")
            if unknown:
                why.append(f"unknown macro(s) {', '.join(unknown)}")
            warnings.append(
                f"{where}: {'; '.join(why)}: key skipped; corral reads keys from its "
                "environment too: set CORRAL_API_KEYS (comma-separated; it replaces api_keys "
                "from the file, so list every key)"
            )
            continue
        if not key:
            warnings.append(f"{where}: empty: skipped")
            continue
        keys.append(key)
    return list(dict.fromkeys(keys))


def _groups(
    sources: list[tuple[str, Any]], models: dict[str, dict[str, Any]], warnings: list[str]
) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for where, table in sources:
        if not table:
            continue
        if not isinstance(table, dict):
            warnings.append(f"{where}: not a mapping: dropped")
            continue
        for name, group in table.items():
            group = dict(group or {})
            groups[str(name)] = {
                "exclusive": bool(group.get("swap", True)),
                "persistent": bool(group.get("persistent", False)),
            }
            if group.get("exclusive", True):
                warnings.append(
                    f"{where}.{name}.exclusive: llama-swap unloads other groups when a member "
                    "loads; corral evicts only to make room (max_instances, memory)"
                )
            for member in group.get("members") or []:
                if member not in models:
                    warnings.append(f"{where}.{name}: member {member!r} is not a converted model")
                    continue
                if "group" in models[member]:
                    warnings.append(
                        f"{where}.{name}: {member!r} is already in group "
                        f"{models[member]['group']!r}; corral allows one group per model"
                    )
                    continue
                models[member]["group"] = str(name)
    return groups


def _routing(data: dict[str, Any], warnings: list[str]) -> list[tuple[str, Any]]:
    """The group tables in effect (legacy ``groups``, ``routing.router.settings.groups``);
    the rest of ``routing`` and a legacy ``matrix`` are warned about."""
    sources: list[tuple[str, Any]] = [("groups", data.get("groups"))]
    if data.get("matrix") is not None:
        warnings.append(f"matrix: corral has no matrix of models that run together; {_EVICTION}")
    routing = data.get("routing")
    if routing is None:
        return sources
    if not isinstance(routing, dict):
        warnings.append("routing: not a mapping: dropped")
        return sources
    router = routing.get("router") or {}
    use = str(router.get("use") or "group")
    settings = router.get("settings") or {}
    where = "routing.router.settings"
    if use == "group":
        sources.append((f"{where}.groups", settings.get("groups")))
    else:
        warnings.append(f"routing.router.use: {use!r}: corral has no such router; {_EVICTION}")
        if settings.get("groups"):
            warnings.append(
                f"{where}.groups: not converted (llama-swap does not use them either: "
                f"routing.router.use is {use!r})"
            )
    if settings.get("matrix") is not None:
        unused = (
            " (llama-swap does not use it either: routing.router.use is 'group')"
            if use == "group"
            else ""
        )
        warnings.append(
            f"{where}.matrix: corral has no matrix of models that run together{unused}; {_EVICTION}"
        )
    for key in sorted(set(map(str, settings)) - {"groups", "matrix"}):
        warnings.append(f"{where}.{key}: no equivalent in corral: dropped")
    for key in sorted(set(map(str, router)) - {"use", "settings"}):
        warnings.append(f"routing.router.{key}: no equivalent in corral: dropped")
    scheduler = routing.get("scheduler") or {}
    fifo = ("buffers each model's waiting requests first in, first out, up to "
            "max_buffered_requests")  # fmt: skip
    if str(scheduler.get("use") or "fifo") != "fifo":
        warnings.append(
            f"routing.scheduler.use: {scheduler['use']!r}: corral has no such scheduler; it {fifo}"
        )
    priority = ((scheduler.get("settings") or {}).get("fifo") or {}).get("priority")
    if priority:
        warnings.append(
            f"routing.scheduler.settings.fifo.priority: corral has no request priorities; it {fifo}"
        )
    for key in sorted(set(map(str, routing)) - {"router", "scheduler"}):
        warnings.append(f"routing.{key}: no equivalent in corral: dropped")
    return sources


def convert(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> Converted:
    """Convert a parsed llama-swap config; the result validates as corral's settings.

    ``${env.NAME}`` macros read ``environ`` (the process environment by default).
    """
    warnings: list[str] = []
    macros = data.get("macros") or {}
    if not isinstance(macros, dict):
        warnings.append("macros: not a mapping: dropped")
        macros = {}
    scope = _Scope(
        {str(k): v for k, v in macros.items()},
        os.environ if environ is None else environ,
        warnings,
    )

    def number(key: str) -> int | float | None:
        if key not in data:
            return None
        return _number(scope.value(data[key], key), key, warnings)

    config: dict[str, Any] = {}
    timeout = number("healthCheckTimeout")
    if timeout is not None:
        config["startup_timeout"] = float(timeout)
    start = number("startPort")
    if start is not None:
        config["port_range"] = f"{int(start)}-{min(int(start) + 199, 65535)}"
    if data.get("sendLoadingState") is not None:
        notices = _flag(scope.value(data["sendLoadingState"], "sendLoadingState"),
                        "sendLoadingState", warnings)  # fmt: skip
        if notices is not None:
            config["loading_notices"] = notices
    global_ttl = number("globalTTL")  # 0: never
    if global_ttl is not None and global_ttl > 0:
        config["model_ttl"] = global_ttl
    else:
        global_ttl = None
    grace = number("unloadTimeout")  # 0: llama-swap's default, 10 s, as corral's
    if grace is not None and grace > 0:
        config["stop_grace"] = grace
    keys = _api_keys(data.get("apiKeys"), scope)
    if keys:
        config["api_keys"] = keys
    models: dict[str, dict[str, Any]] = {}
    for model_id, entry in (data.get("models") or {}).items():
        converted = _model(str(model_id), dict(entry or {}), scope, global_ttl)
        if converted is not None:
            models[str(model_id)] = converted
    groups = _groups(_routing(data, warnings), models, warnings)
    aliases = {a: m for m, c in models.items() for a in c.get("aliases", [])}
    hooks = (data.get("hooks") or {}).get("on_startup") or {}
    for model_id in hooks.get("preload") or []:
        model_id = aliases.get(model_id, model_id)  # llama-swap takes an alias too
        if model_id in models:
            models[model_id]["preload"] = True
        else:
            warnings.append(f"hooks.on_startup.preload: {model_id!r} is not a converted model")
    known = {
        "macros", "models", "groups", "matrix", "routing", "hooks", "healthCheckTimeout",
        "startPort", "sendLoadingState", "globalTTL", "unloadTimeout", "apiKeys",
    }  # fmt: skip
    for key in sorted(set(map(str, data)) - known - _IGNORED_TOP):
        hint = f" ({_HINTS[key]})" if key in _HINTS else ""
        warnings.append(f"{key}: no equivalent in corral: dropped{hint}")
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
    return Converted(config, list(dict.fromkeys(warnings)))
