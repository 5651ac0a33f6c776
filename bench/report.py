"""Writes docs/benchmarks.md from the sections a run produced.

Each section is wrapped in HTML comments that name its workload and the run it came
from (``<!-- bench:section NAME run="..." command="..." -->`` ... ``<!-- bench:end NAME
-->``), so a run of some workloads can carry the other workloads' sections over from the
previous report unchanged, marked as coming from an earlier run.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.machine import Machine
from bench.workloads import Section


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> str:
    """A GitHub markdown table; columns from ``right_from`` on are right-aligned."""
    align = ["---" if i < right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class RunInfo:
    command: str
    started: dt.datetime
    wall_seconds: float
    machine: Machine
    versions: list[tuple[str, str, str]]  # (system, version, setup)
    version_notes: list[str]
    llama_args: Sequence[str]
    model_description: str


METHOD = """\
- **Every system runs alone.** The harness starts one system (with its own
  llama-server: same binary, same model file, same arguments), measures it, stops it
  and only then starts the next, so no two compete for the cores. Everything listens
  on 127.0.0.1 and is stopped at the end (own process groups, killed on exit).
- **Paired baseline (overhead).** While a system is up, each cell alternates short blocks of
  requests (25 per client, a fraction of a second, with 0.25 s idle before each
  switch) to the system's front door and straight to the llama-server behind it, in
  ABBA order. "Added" latency is the system's percentile minus the percentile of those
  direct requests to the *same* llama-server in the *same* seconds, which cancels most
  of the drift and the bursts of other work on a shared machine. The idle moment lets
  corral's agent report the slots freed by the direct requests before corral's turn.
- **One connection per request, for every system.** llama-server closes the
  connection after a streamed response while still advertising `Keep-Alive`; a pooled
  client that reuses it sees `ServerDisconnectedError`, which would be charged to
  whichever system happened to pass the close through. The load generator therefore
  opens a fresh TCP connection for each request (`aiohttp.TCPConnector(force_close=True)`)
  for all systems alike. Each proxy keeps whatever upstream pooling it has by default.
- **Closed loop** (overhead): N clients each send their next request when the previous
  one ends. Latency runs from sending the request to the last body byte; TTFT to the
  first body byte (for streams, the first SSE event). Percentiles are over successful
  requests; errors are counted by kind.
- **Readiness** is timed against llama-server's own log lines (its section says how):
  cold starts and crashes, one system at a time, the systems alternating trial by trial.
- **Absolute times from a shared 2-core VM are noise; the ratios from one run are the
  figures.** The load generator shares the same cores as the servers.
"""


@dataclass(frozen=True)
class KeptSection:
    """A section of the previous report, for a workload this run did not run."""

    name: str
    title: str
    run: str  # "YYYY-MM-DD HH:MM UTC" of the run that made it
    command: str
    body: str  # everything under its heading, images and "Not measured" included


_START = re.compile(r'^<!-- bench:section (\S+) run="([^"]*)" command="([^"]*)" -->$', re.M)
_KEPT_NOTE = "*Not rerun by the command above: "


def _strip_note(body: str) -> str:
    lines = body.strip().splitlines()
    if lines and lines[0].startswith(_KEPT_NOTE):
        lines = lines[1:]
    return "\n".join(lines).strip()


def previous_sections(path: Path, titles: Mapping[str, str]) -> dict[str, KeptSection]:
    """The sections of the report at ``path`` for the workloads in ``titles`` (name ->
    title). Reads the bench:section markers; a report written before they existed is
    cut at its "## TITLE" headings and dated by its header."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    found: dict[str, KeptSection] = {}
    for match in _START.finditer(text):
        name = match.group(1)
        end = text.find(f"<!-- bench:end {name} -->", match.end())
        if name not in titles or end < 0:
            continue
        heading = f"## {titles[name]}"
        chunk = text[match.end() : end].strip()
        if not chunk.startswith(heading):
            continue
        run, command = html.unescape(match.group(2)), html.unescape(match.group(3))
        body = _strip_note(chunk[len(heading) :])
        found[name] = KeptSection(name, titles[name], run, command, body)
    if found or "<!-- bench:section" in text:
        return found
    command = re.search(r"^```sh\n(.*?)\n```", text, re.M | re.S)
    run = re.search(r"^Run at (.*? UTC),", text, re.M)
    for name, title in titles.items():
        heading = re.search(rf"^## {re.escape(title)}\n", text, re.M)
        if heading is None:
            continue
        following = re.search(r"^## ", text[heading.end() :], re.M)
        stop = heading.end() + following.start() if following else len(text)
        found[name] = KeptSection(
            name,
            title,
            run.group(1) if run else "an earlier run",
            command.group(1).strip() if command else "",
            _strip_note(text[heading.end() : stop]),
        )
    return found


def _marker(name: str, run: str, command: str) -> str:
    quote = html.escape  # keeps the attribute free of '"', and '-->' can't close it early
    return f'<!-- bench:section {name} run="{quote(run)}" command="{quote(command)}" -->'


def render(info: RunInfo, sections: Sequence[Section | KeptSection], out: Path) -> str:
    parts = [
        "# Benchmarks",
        "",
        "Generated by `bench/` — do not edit by hand; rerun the command below instead.",
        "",
        "```sh",
        info.command,
        "```",
        "",
        f"Run at {info.started:%Y-%m-%d %H:%M} UTC, {info.wall_seconds:.0f} s wall time in all.",
        "",
        "## Contents",
        "",
        *[f"- [{s.title}](#{_anchor(s.title)})" for s in sections],
        "- [Method](#method)",
        "- [Machine and versions](#machine-and-versions)",
        "",
    ]
    run = f"{info.started:%Y-%m-%d %H:%M} UTC"
    for section in sections:
        if isinstance(section, KeptSection):
            parts += [
                _marker(section.name, section.run, section.command),
                f"## {section.title}",
                "",
                f"{_KEPT_NOTE}kept from the run of {section.run} "
                f"(`{section.command}`); `python -m bench {section.name}` refreshes it.*",
                "",
                section.body,
                "",
                f"<!-- bench:end {section.name} -->",
                "",
            ]
            continue
        parts += [_marker(section.name, run, info.command), f"## {section.title}", ""]
        parts += [section.markdown.strip(), ""]
        for image in section.images:
            rel = os.path.relpath(image, out.parent)
            parts += [f"![{image.stem}]({rel})", ""]
        if section.missing:
            parts += ["Not measured:", ""]
            parts += [f"- **{name}**: {why}" for name, why in section.missing.items()]
            parts += [""]
        parts += [f"<!-- bench:end {section.name} -->", ""]
    parts += ["## Method", "", METHOD.strip(), ""]
    parts += [
        "## Machine and versions",
        "",
        md_table(["", ""], info.machine.rows(), right_from=2),
        "",
        md_table(["system", "version", "set-up"], info.versions, right_from=3),
        "",
        *[line for note in info.version_notes for line in (note, "")],
        f"Model: {info.model_description}.",
        "",
        f"llama-server arguments shared by every system: `{' '.join(info.llama_args)}`.",
        "",
    ]
    return "\n".join(parts)


def _anchor(title: str) -> str:
    keep = [c for c in title.lower() if c.isalnum() or c in " -_"]
    return "".join(keep).replace(" ", "-")
