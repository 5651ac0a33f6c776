"""Which llama-server arguments an operator may set through the management API.

corral owns an instance's address, its model identity and its secrets, so those
flags are refused when arguments come over the network (reconfigure) or from the
command line of ``serve``/``agent --model``. Flags that make llama-server read or
write arbitrary files are refused too, so a management token can't be turned into a
file read or write on an agent's host. Every refusal names the flag and says why.

This is a deny-list; the router issue may replace it with an allow-list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: flag -> why corral refuses it
DENIED: dict[str, str] = {}
for _names, _why in (
    (("--host", "--port", "--reuse-port"), "corral sets the listening address"),
    (
        ("-m", "--model", "-a", "--alias", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo",
         "-hff", "--hf-file", "-dr", "--docker-repo", "--models-dir", "--models-preset"),
        "corral sets the model",
    ),
    (
        ("--api-key", "--api-key-file", "-hft", "--hf-token", "--ssl-key-file",
         "--ssl-cert-file"),
        "secrets and TLS are corral's to manage",
    ),
    (
        ("--slot-save-path", "--log-file", "--lora", "--lora-scaled", "--control-vector",
         "--control-vector-scaled", "-md", "--model-draft", "--mmproj", "--mmproj-url",
         "--media-path", "--path"),
        "it reads or writes files chosen by the caller",
    ),
):  # fmt: skip
    for _name in _names:
        DENIED[_name] = _why


class FlagError(ValueError):
    """An argument list corral will not pass to llama-server."""


def check_llama_args(args: Sequence[object]) -> list[str]:
    """Return ``args`` as strings, or raise :class:`FlagError` naming each bad one."""
    problems: list[str] = []
    out: list[str] = []
    for index, arg in enumerate(args):
        if not isinstance(arg, str):
            problems.append(f"argument {index} must be a string, got {type(arg).__name__}")
            continue
        if "\x00" in arg:
            problems.append(f"argument {index} contains a NUL byte")
            continue
        flag = arg.split("=", 1)[0]
        if flag in DENIED:
            problems.append(f"{flag} is not allowed: {DENIED[flag]}")
        out.append(arg)
    if problems:
        raise FlagError("; ".join(problems))
    return out


def llama_arg(
    args: Sequence[str], flag: str, env_var: str, env: Mapping[str, str] | None = None
) -> str | None:
    """The value llama-server takes for ``flag`` from these arguments (``FLAG V`` or
    ``FLAG=V``, the last one winning), else from its ``env_var`` in ``env``."""
    value = (env or {}).get(env_var)
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def sleeps(args: Sequence[str], env: Mapping[str, str] | None = None) -> bool:
    """The llama-server these arguments start sleeps when idle (``--sleep-idle-seconds``
    N >= 0, or ``LLAMA_ARG_SLEEP_IDLE_SECONDS``)."""
    value = llama_arg(args, "--sleep-idle-seconds", "LLAMA_ARG_SLEEP_IDLE_SECONDS", env)
    try:
        return value is not None and int(value) >= 0
    except ValueError:
        return False


def api_key_of(args: Sequence[str], env: Mapping[str, str] | None = None) -> str | None:
    """The first ``--api-key`` (or ``LLAMA_API_KEY``) these arguments give llama-server:
    its agent reads ``/props`` and ``/slots`` with it."""
    value = llama_arg(args, "--api-key", "LLAMA_API_KEY", env)
    keys = [k.strip() for k in (value or "").split(",") if k.strip()]
    return keys[0] if keys else None
