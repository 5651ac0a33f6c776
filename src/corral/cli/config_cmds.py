"""``corral config``: schema, check, import-llama-swap."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from corral.cli.common import (
    _err,
)
from corral.config import check_file, json_schema

if TYPE_CHECKING:
    pass


def cmd_config_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json_schema() + "\n")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    issues = check_file(args.file)
    if not issues:
        sys.stdout.write(f"{args.file}: OK\n")
        return 0
    for issue in issues:
        sys.stdout.write(f"{issue}\n")
    sys.stdout.write(f"{len(issues)} error(s)\n")
    return 1


def cmd_config_import_llama_swap(args: argparse.Namespace) -> int:
    import yaml

    from corral.llama_swap import convert

    try:
        data = yaml.safe_load(args.file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        _err(f"{args.file}: cannot read: {exc}")
        return 2
    if not isinstance(data, dict):
        _err(f"{args.file}: expected a mapping at the top level")
        return 2
    try:
        converted = convert(data)
    except (ValueError, TypeError) as exc:
        _err(f"{args.file}: the converted config is not valid: {exc}")
        return 1
    for warning in converted.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    text = yaml.safe_dump(converted.config, sort_keys=False)
    if args.write is not None:
        args.write.write_text(text, encoding="utf-8")
        models = len(converted.config.get("models", {}))
        sys.stderr.write(f"wrote {args.write}: {models} model(s)\n")
    else:
        sys.stdout.write(text)
    return 0


# -- llama-server ------------------------------------------------------------------------
