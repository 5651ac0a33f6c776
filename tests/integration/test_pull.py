"""``corral models pull`` through the real huggingface_hub against a fake hub.

The hub is not reachable from tests, so :class:`corral.testing.fake_hf_hub.FakeHub`
answers in its place (a real HTTP server on loopback, found through ``HF_ENDPOINT``)
and serves tiny generated GGUF files. Downloads land in a temporary ``HF_HOME``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import huggingface_hub.constants
import pytest
from huggingface_hub.utils import tqdm

from corral.catalog.pull import pull as pull_model
from corral.cli import main
from corral.testing.fake_hf_hub import FakeHub
from tests.unit.test_catalog import mmproj, tiny, write_gguf

REPO = "org/Model-GGUF"
GOOD_TOKEN = "hf_fake_token_with_access"
OTHER_TOKEN = "hf_fake_token_without_access"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """GGUF files as a GGUF repo names them (distinct contents, so distinct blobs)."""
    folder = tmp_path_factory.mktemp("repo")
    made: dict[str, bytes] = {}
    for seed, quant in enumerate(("Q4_K_M", "Q8_0", "BF16")):
        made[f"Model-{quant}.gguf"] = tiny(folder / f"Model-{quant}.gguf", seed=seed).read_bytes()
    first = write_gguf(folder / "split" / "Model-Q6_K.gguf", n_tensors=3, split_max_tensors=1)
    for shard in sorted(first.parent.glob("*.gguf")):
        made[shard.name] = shard.read_bytes()
    for name, file_type in (
        ("mmproj-F32.gguf", gguf.LlamaFileType.ALL_F32),
        ("mmproj-F16.gguf", gguf.LlamaFileType.MOSTLY_F16),
        ("mmproj-BF16.gguf", gguf.LlamaFileType.MOSTLY_BF16),
    ):
        made[name] = mmproj(folder / name, file_type).read_bytes()
    return made


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(tokens=frozenset({GOOD_TOKEN, OTHER_TOKEN})) as running:
        yield running


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> Path:
    """A private HF_HOME (and llama.cpp cache) with HF_ENDPOINT at the fake hub."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "llama.cpp"))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    # huggingface_hub reads a stored login from a path fixed at import: keep the
    # developer's own login (if any) out of these tests.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    # ... and its telemetry (a registry fetched from the import-time endpoint, the real
    # hub) out of the network; subprocesses send it to the fake hub, which answers 404.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return tmp_path / "hf"


def snapshot(hf_home: Path, hub: FakeHub, repo: str = REPO, branch: str = "main") -> Path:
    commit = hub.repos[repo].commit(branch)
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def pull(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str], str]:
    """Run ``corral models pull ARGS``: exit code, stdout as ``key: value``, stderr."""
    code = main(["models", "pull", *args])
    out, err = capsys.readouterr()
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return code, fields, err


def downloads(hub: FakeHub) -> list[str]:
    """The blobs fetched from the fake CDN, i.e. the files actually downloaded."""
    return [r.path for r in hub.requests if r.origin == "cdn"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- choosing and downloading ----------------------------------------------------------


def test_pull_without_a_quant_takes_q4_k_m_and_prints_the_id_discovery_serves_it_under(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    names = ("Model-Q4_K_M.gguf", "Model-Q8_0.gguf", "Model-BF16.gguf")
    hub.add(REPO, {**{n: files[n] for n in names}, "README.md": b"# Model\n"})

    code, out, err = pull(capsys, REPO)

    assert code == 0, err
    where = snapshot(hf_home, hub)
    assert out == {
        "id": "Model-Q4_K_M",
        "alias": f"{REPO}:Q4_K_M",
        "path": str(where / "Model-Q4_K_M.gguf"),
    }
    assert (where / "Model-Q4_K_M.gguf").read_bytes() == files["Model-Q4_K_M.gguf"]
    assert sorted(p.name for p in where.iterdir()) == ["Model-Q4_K_M.gguf"]
    assert (where.parent.parent / "refs" / "main").read_text() == hub.repos[REPO].commit("main")
    assert f"pulling {REPO}:Q4_K_M from {hub.endpoint}, revision main" in err
    assert "[1/1] Model-Q4_K_M.gguf (" in err


def test_pull_with_a_quant_in_any_case_takes_that_file(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(REPO, {n: files[n] for n in ("Model-Q4_K_M.gguf", "Model-Q8_0.gguf")})

    code, out, err = pull(capsys, f"{REPO}:q8_0")

    assert code == 0, err
    assert out["id"] == "Model-Q8_0"
    assert out["alias"] == f"{REPO}:Q8_0"
    assert Path(out["path"]).read_bytes() == files["Model-Q8_0.gguf"]
    assert len(downloads(hub)) == 1


def test_pull_of_a_split_model_takes_every_shard_and_models_list_shows_one_model(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    shards = sorted(n for n in files if n.startswith("Model-Q6_K-"))
    assert len(shards) == 3
    hub.add(REPO, {**{n: files[n] for n in shards}, "Model-Q8_0.gguf": files["Model-Q8_0.gguf"]})

    code, out, err = pull(capsys, f"{REPO}:Q6_K")

    assert code == 0, err
    assert out["id"] == "Model-Q6_K"
    assert out["path"] == str(snapshot(hf_home, hub) / shards[0])
    assert "[3/3] Model-Q6_K-00003-of-00003.gguf" in err
    assert main(["models", "list", "--models-dir", str(hf_home / "hub"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["problems"] == []
    (model,) = listed["models"]
    assert model["id"] == "Model-Q6_K"
    assert [Path(p).name for p in model["shards"]] == shards
    assert model["size_bytes"] == sum(len(files[n]) for n in shards)


def test_pull_takes_the_bf16_mmproj_and_discovery_attaches_it(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    projectors = ("mmproj-F32.gguf", "mmproj-F16.gguf", "mmproj-BF16.gguf")
    hub.add(REPO, {n: files[n] for n in ("Model-Q4_K_M.gguf", *projectors)})

    code, out, err = pull(capsys, REPO)

    assert code == 0, err
    where = snapshot(hf_home, hub)
    assert out["mmproj"] == str(where / "mmproj-BF16.gguf")
    assert sorted(p.name for p in where.iterdir()) == ["Model-Q4_K_M.gguf", "mmproj-BF16.gguf"]
    assert "[2/2] mmproj-BF16.gguf" in err


def test_pull_with_no_mmproj_leaves_the_projector(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(REPO, {n: files[n] for n in ("Model-Q4_K_M.gguf", "mmproj-F16.gguf")})

    code, out, err = pull(capsys, REPO, "--no-mmproj")

    assert code == 0, err
    assert "mmproj" not in out
    assert [p.name for p in snapshot(hf_home, hub).iterdir()] == ["Model-Q4_K_M.gguf"]


def test_pull_of_a_revision_downloads_that_commit(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(REPO, {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]})
    hub.add(REPO, {"Model-Q4_K_M.gguf": files["Model-Q8_0.gguf"]}, branch="v2")

    code, out, err = pull(capsys, REPO, "--revision", "v2")

    assert code == 0, err
    where = snapshot(hf_home, hub, branch="v2")
    assert out["path"] == str(where / "Model-Q4_K_M.gguf")
    assert Path(out["path"]).read_bytes() == files["Model-Q8_0.gguf"]
    assert (where.parent.parent / "refs" / "v2").read_text() == hub.repos[REPO].commit("v2")


def test_a_second_pull_downloads_nothing_again(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(REPO, {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]})
    first = pull(capsys, REPO)
    assert first[0] == 0 and len(downloads(hub)) == 1

    again = pull(capsys, REPO)

    assert again[0] == 0
    assert again[1] == first[1]
    assert len(downloads(hub)) == 1


# -- errors ----------------------------------------------------------------------------


def test_unknown_quant_fails_listing_the_quants_the_repo_has(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(REPO, {n: files[n] for n in ("Model-Q4_K_M.gguf", "Model-Q8_0.gguf")})

    code, out, err = pull(capsys, f"{REPO}:Q5_K_S")

    assert code == 1
    assert out == {}
    assert err == f"corral: {REPO} has no Q5_K_S model; available: Q4_K_M, Q8_0\n"
    assert downloads(hub) == []


def test_unknown_repo_fails_with_not_found_at_the_endpoint(
    hub: FakeHub, hf_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = pull(capsys, "org/missing-GGUF:Q4_K_M")

    assert code == 1
    assert err == (
        f"corral: repository org/missing-GGUF not found at {hub.endpoint} "
        "(or it is private: pass --token or set HF_TOKEN)\n"
    )


def test_unknown_revision_fails_naming_it(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(REPO, {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]})

    code, _, err = pull(capsys, REPO, "--revision", "nope")

    assert code == 1
    assert err == f"corral: revision 'nope' not found in {REPO} at {hub.endpoint}\n"


def test_repo_without_gguf_files_fails_saying_so(
    hub: FakeHub, hf_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add("org/Model", {"model.safetensors": b"\0" * 64, "config.json": b"{}"})

    code, _, err = pull(capsys, "org/Model")

    assert code == 1
    assert err == (
        "corral: org/Model has no GGUF model files: none among its 2 file(s); "
        "corral serves GGUF models\n"
    )


def test_unreachable_hub_fails_naming_the_endpoint(
    hf_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)

    code, _, err = pull(capsys, REPO)

    assert code == 1
    assert err.startswith(f"corral: could not reach the Hugging Face hub at {endpoint}: ")
    assert err.count("\n") == 1


def test_hub_that_never_answers_times_out_naming_the_endpoint(
    hf_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")

        code, _, err = pull(capsys, REPO)

    assert code == 1
    assert err == (
        f"corral: could not reach the Hugging Face hub at {endpoint}: it did not answer in time\n"
    )


def test_gated_repo_without_a_token_fails_with_401_and_where_to_accept_its_terms(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(
        REPO,
        {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]},
        gated=True,
        allowed_tokens=frozenset({GOOD_TOKEN}),
    )

    code, _, err = pull(capsys, REPO)

    assert code == 1
    assert err.splitlines()[-1] == (
        f"corral: {REPO} is gated (401): accept its terms at {hub.endpoint}/{REPO}, "
        "then pass --token or set HF_TOKEN"
    )
    assert downloads(hub) == []


def test_gated_repo_with_a_token_without_access_fails_with_403_never_printing_it(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(
        REPO,
        {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]},
        gated=True,
        allowed_tokens=frozenset({GOOD_TOKEN}),
    )

    code, _, err = pull(capsys, REPO, "--token", OTHER_TOKEN)

    assert code == 1
    assert err.splitlines()[-1].startswith(
        f"corral: {REPO} is gated and this token has no access (403): "
    )
    assert OTHER_TOKEN not in err


def test_a_token_the_hub_does_not_know_is_refused_with_401(
    hub: FakeHub,
    hf_home: Path,
    files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hub.add(REPO, {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]})
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")

    code, _, err = pull(capsys, REPO)

    assert code == 1
    assert err == (
        f"corral: the hub at {hub.endpoint} refused the token "
        "(401: Invalid credentials in Authorization header)\n"
    )


def test_malformed_spec_fails_before_asking_the_hub(
    hub: FakeHub, hf_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = pull(capsys, "../../etc/passwd")

    assert code == 2
    assert "is not a Hugging Face repo (expected ORG/REPO[:QUANT]" in err
    assert hub.requests == []


# -- as a user runs it -----------------------------------------------------------------


def corral(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def clean_env(tmp_path: Path, hub: FakeHub) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORRAL_", "HF_", "HUGGING")) and k != "LLAMA_CACHE"
    }
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=hub.endpoint,
        LLAMA_CACHE=str(tmp_path / "llama.cpp"),
    )
    return env


def test_cli_pulls_a_split_model_with_its_mmproj_then_models_list_serves_it(
    tmp_path: Path, hub: FakeHub, files: dict[str, bytes]
) -> None:
    shards = sorted(n for n in files if n.startswith("Model-Q6_K-"))
    hub.add(REPO, {n: files[n] for n in (*shards, "Model-Q8_0.gguf", "mmproj-F16.gguf")})
    env = clean_env(tmp_path, hub)

    pulled = corral(env, "models", "pull", f"{REPO}:q6_k")

    assert pulled.returncode == 0, pulled.stderr
    where = snapshot(tmp_path / "hf", hub)
    assert pulled.stdout.splitlines() == [
        "id: Model-Q6_K",
        f"alias: {REPO}:Q6_K",
        f"path: {where / shards[0]}",
        f"mmproj: {where / 'mmproj-F16.gguf'}",
    ]
    assert pulled.stderr.splitlines()[-1] == (
        "`corral serve` finds it in the hub cache; ask for model Model-Q6_K"
    )
    listed = corral(env, "models", "list", "--json")  # the default folders: both caches
    assert listed.returncode == 0, listed.stderr
    (model,) = json.loads(listed.stdout)["models"]
    assert model["id"] == "Model-Q6_K"
    assert model["aliases"] == [f"{REPO}:Q6_K"]
    assert model["repo"] == REPO
    assert model["mmproj"] == str(where / "mmproj-F16.gguf")
    assert len(model["shards"]) == 3


def test_cli_pulls_a_gated_repo_with_hf_token_and_never_prints_the_token(
    tmp_path: Path, hub: FakeHub, files: dict[str, bytes]
) -> None:
    hub.add(
        REPO,
        {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]},
        gated=True,
        allowed_tokens=frozenset({GOOD_TOKEN}),
    )
    env = {**clean_env(tmp_path, hub), "HF_TOKEN": GOOD_TOKEN}

    pulled = corral(env, "--log-level", "DEBUG", "models", "pull", REPO)

    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.splitlines()[0] == "id: Model-Q4_K_M"
    assert GOOD_TOKEN not in pulled.stdout + pulled.stderr
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(r.authorized for r in resolves)
    assert all(not r.authorized for r in hub.requests if r.origin == "cdn")


def test_progress_bars_count_every_byte_of_each_file_under_its_name(
    hub: FakeHub, hf_home: Path, files: dict[str, bytes]
) -> None:
    names = ("Model-Q4_K_M.gguf", "mmproj-F16.gguf")
    hub.add(REPO, {n: files[n] for n in names})
    bars: list[Any] = []

    class Recorder(tqdm):  # huggingface_hub's bar class, silent and remembered
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            bars.append(self)

    announced: list[tuple[int, str, int | None]] = []
    result = pull_model(REPO, on_file=lambda *a: announced.append(a), tqdm_class=Recorder)

    assert [p.name for p in result.paths] == list(names)
    assert announced == [(i, n, len(files[n])) for i, n in enumerate(names)]
    assert [(b.desc, b.total, b.n) for b in bars] == [
        (n, len(files[n]), len(files[n])) for n in names
    ]


def test_cli_pull_with_hf_hub_offline_says_so_without_asking_the_hub(
    tmp_path: Path, hub: FakeHub, files: dict[str, bytes]
) -> None:
    hub.add(REPO, {"Model-Q4_K_M.gguf": files["Model-Q4_K_M.gguf"]})
    env = {**clean_env(tmp_path, hub), "HF_HUB_OFFLINE": "1"}

    pulled = corral(env, "models", "pull", REPO)

    assert pulled.returncode == 1
    assert pulled.stderr == (
        "corral: HF_HUB_OFFLINE is set, so the hub is not asked; unset it to pull\n"
    )
    assert hub.requests == []
