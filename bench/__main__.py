"""``python -m bench WORKLOAD...``: run benchmarks, write docs/benchmarks.md and plots.

Everything the run needs is started here on loopback and stopped before it returns:
a tiny model is generated, each system is started in turn, measured and stopped.
Logs, configs and the model go to ``bench/out/run/`` (git-ignored), cleared first.
The report gets a section per workload run; the sections of workloads not run this time
are carried over from the previous report, each marked with the run it came from.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import procs
from bench.context import REPO_ROOT, BenchContext
from bench.machine import Machine
from bench.report import RunInfo, previous_sections, render
from bench.systems import ALL_SYSTEMS, make_systems
from bench.workloads import Section, discover

log = logging.getLogger("bench")

DEFAULT_SYSTEMS = [name for name in ALL_SYSTEMS if name != "corral-base"]


def _parser(workloads: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark corral against llama-server, its router mode, LiteLLM and "
        "nginx; write docs/benchmarks.md and PNG plots.",
    )
    parser.add_argument(
        "workloads",
        nargs="+",
        choices=[*workloads, "all"],
        metavar="WORKLOAD",
        help=f"one or more of: {', '.join(workloads)}, or all",
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (default: all but "
        "corral-base, which needs CORRAL_BENCH_BASELINE)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every request count (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="same as --scale 0.25")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="report file"
    )
    parser.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    parser.add_argument(
        "--run-dir", type=Path, default=REPO_ROOT / "bench" / "out" / "run", help="scratch"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="don't pip-install LiteLLM if missing"
    )
    return parser


def _display_command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(REPO_ROOT))
    except ValueError:
        shown = "python"
    return shlex.join([shown, "-m", "bench", *argv])


def _model_description(model: Path) -> str:
    size = model.stat().st_size / 1024
    return (
        f"`{model.name}`, written by `corral models make-tiny` with its defaults "
        f"(llama architecture, n_embd 64, 2 layers, 4 heads, random weights, {size:.0f} KiB); "
        "it never emits end-of-generation, so every request produces exactly `max_tokens`"
    )


async def _run(ctx: BenchContext, names: list[str]) -> list[Section]:
    workloads = discover()
    sections = []
    for name in names:
        log.info("workload %s: start", name)
        started = time.monotonic()
        section = await workloads[name].run(ctx)
        section.name = section.name or name
        sections.append(section)
        log.info("workload %s: done in %.0f s", name, time.monotonic() - started)
    return sections


def _run_loop(ctx: BenchContext, names: list[str]) -> list[Section]:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(ctx, names))
    except ImportError:  # pragma: no cover - uvloop comes with corral on Linux
        return asyncio.run(_run(ctx, names))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    workloads = discover()
    args = _parser(list(workloads)).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s")
    procs.install_cleanup()

    names = list(workloads) if "all" in args.workloads else list(dict.fromkeys(args.workloads))
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        sys.stderr.write(f"bench: unknown systems {unknown}; known: {list(ALL_SYSTEMS)}\n")
        return 2

    from corral.catalog.tiny import make_tiny_model
    from corral.supervisor.binary import LlamaServerNotFound, find_llama_server

    try:
        binary = find_llama_server(args.llama_server).path
    except LlamaServerNotFound as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 2

    run_dir: Path = args.run_dir.resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    logging.getLogger("corral").setLevel(logging.WARNING)
    model = make_tiny_model(run_dir / "models" / "tiny.gguf")
    out: Path = args.out.resolve()
    ctx = BenchContext(
        llama_server=binary,
        model=model,
        run_dir=run_dir,
        docs_dir=out.parent,
        scale=0.25 if args.quick else args.scale,
        systems=systems,
        install_missing=not args.no_install,
    )
    started_at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    log.info("llama-server %s; model %s; logs in %s", binary, model, run_dir / "logs")
    try:
        sections = _run_loop(ctx, names)
    finally:
        procs.stop_all()
    info = RunInfo(
        command=_display_command(argv),
        started=started_at,
        wall_seconds=time.monotonic() - started,
        machine=Machine.here(),
        versions=[(s.label, s.version(ctx), s.setup(ctx)) for s in make_systems(systems)],
        version_notes=[n for s in make_systems(systems) if (n := s.note(ctx))],
        llama_args=ctx.llama_args,
        model_description=_model_description(model),
    )
    # workloads not run this time keep their sections from the previous report
    kept = previous_sections(out, {w.name: w.title for w in workloads.values()})
    ran = {s.name: s for s in sections}
    entries = [e for n in workloads if (e := ran.get(n) or kept.get(n)) is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(info, entries, out), encoding="utf-8")
    log.info("wrote %s (%.0f s)", os.path.relpath(out), info.wall_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
