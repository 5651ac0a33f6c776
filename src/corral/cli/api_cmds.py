"""``corral openapi``: the management API's OpenAPI description, from the code."""

from __future__ import annotations

import argparse
import sys

from corral.control.openapi import openapi_text


def cmd_openapi(args: argparse.Namespace) -> int:
    """Print the document, or write it to ``--output`` (how ``docs/openapi.json`` is
    made: a test fails while that file and the code disagree)."""
    text = openapi_text()
    if args.output is None:
        sys.stdout.write(text)
        return 0
    args.output.write_text(text, encoding="utf-8")
    sys.stderr.write(f"wrote {args.output}\n")
    return 0
