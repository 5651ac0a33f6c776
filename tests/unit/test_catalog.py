"""The model catalog: GGUF headers, folder and hub-cache discovery, splits, projectors,
ids, rescans, bad files, and ``corral models list``/``import``.

Every model here is a real GGUF file (``make_tiny_model`` or ``gguf.GGUFWriter``), a
few kilobytes each, so the header reader is tested against what the writer llama.cpp's
own tooling uses really produces.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import yaml

from corral.catalog.catalog import Catalog, watch
from corral.catalog.discovery import scan, scan_folders
from corral.catalog.folders import (
    default_models_dirs,
    folder_signature,
    hf_hub_cache_dir,
    llama_cpp_cache_dir,
)
from corral.catalog.gguf_header import GGUFError, read_gguf_metadata
from corral.catalog.model import CatalogChange, CatalogModel
from corral.catalog.tiny import make_tiny_model, tiny_model_shape
from corral.cli import main
from corral.config import ModelConfig, check_file

SMALL: dict[str, Any] = {"n_embd": 32, "n_layer": 1, "n_words": 8}


def tiny(path: Path, **kwargs: Any) -> Path:
    """A tiny llama GGUF (about 100 KiB) at ``path``."""
    return make_tiny_model(path, **{**SMALL, **kwargs})


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    kind: str | None = None,
    file_type: int | None = None,
    n_tensors: int = 1,
    split_max_tensors: int = 0,
    dtype: type[np.floating] = np.float32,
) -> Path:
    """A minimal GGUF with ``n_tensors`` 8x4 tensors; ``split_max_tensors`` shards it the
    way ``gguf-split`` names shards (``stem-00001-of-0000N.gguf``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    if kind:
        writer.add_type(kind)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_context_length(1024)
    for i in range(n_tensors):
        writer.add_tensor(f"t{i}.weight", np.zeros((8, 4), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mmproj(path: Path, file_type: int | None) -> Path:
    return write_gguf(path, arch="clip", kind="mmproj", file_type=file_type, dtype=np.float16)


def by_id(models: list[CatalogModel]) -> dict[str, CatalogModel]:
    return {m.id: m for m in models}


def get(catalog: Catalog, name: str) -> CatalogModel:
    found = catalog.get(name)
    assert found is not None, f"{name} is not in the catalog"
    return found


def parent_and_name(model: CatalogModel, root: Path) -> str:
    assert model.path is not None
    return model.path.relative_to(root).as_posix()


# -- GGUF header ---------------------------------------------------------------------


def test_header_gives_architecture_context_params_quantization_and_template(
    tmp_path: Path,
) -> None:
    path = tiny(tmp_path / "m.gguf", n_ctx=2048)
    meta = read_gguf_metadata(path)
    shapes = tiny_model_shape(n_embd=32, n_layer=1, n_words=8).tensor_shapes().values()
    assert meta.architecture == "llama"
    assert meta.context_length == 2048
    assert meta.parameter_count == sum(math.prod(s) for s in shapes)
    assert meta.quantization == "F32"
    assert meta.has_chat_template is True
    assert meta.gguf_type == "model"
    assert meta.size_bytes == path.stat().st_size
    # Same answer as the gguf package's own (slow) reader.
    reader = gguf.GGUFReader(path)
    assert meta.parameter_count == sum(t.n_elements for t in reader.tensors)
    assert meta.tensor_count == len(reader.tensors)
    f16 = read_gguf_metadata(tiny(tmp_path / "h.gguf", dtype="f16"))
    assert f16.quantization == "F16"


def test_quantization_without_file_type_is_named_after_most_weights(tmp_path: Path) -> None:
    meta = read_gguf_metadata(write_gguf(tmp_path / "x.gguf", dtype=np.float16))
    assert meta.file_type is None
    assert meta.quantization == "F16"
    assert meta.has_chat_template is False


# -- discovery -----------------------------------------------------------------------


def test_folders_are_scanned_recursively_with_ids_from_file_names(tmp_path: Path) -> None:
    tiny(tmp_path / "a" / "alpha.gguf")
    tiny(tmp_path / "a" / "deep" / "er" / "beta-Q8_0.gguf")
    tiny(tmp_path / "b" / "gamma.GGUF")
    (tmp_path / "a" / "notes.txt").write_text("not a model")
    tiny(tmp_path / "a" / ".hidden" / "skipped.gguf")
    models = by_id(scan([tmp_path / "a", tmp_path / "b"]))
    assert sorted(models) == ["alpha", "beta-Q8_0", "gamma"]
    assert models["beta-Q8_0"].path == tmp_path / "a" / "deep" / "er" / "beta-Q8_0.gguf"
    assert all(m.source == "auto" and m.mmproj is None for m in models.values())


def test_hub_cache_layout_follows_blob_symlinks_and_prefers_the_main_revision(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "hub" / "models--some-org--Some-Model-GGUF"
    old_blob = tiny(repo / "blobs" / "aaaa", seed=1)
    new_blob = tiny(repo / "blobs" / "bbbb", seed=2, n_ctx=8192)
    for rev, blob in (("rev1", old_blob), ("rev2", new_blob)):
        link = repo / "snapshots" / rev / "Some-Model-Q4_K_M.gguf"
        link.parent.mkdir(parents=True)
        link.symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev2")
    (repo / "snapshots" / "rev2" / "gone.gguf").symlink_to("../../blobs/missing")
    marker = repo / ".no_exist" / "rev2" / "mmproj.gguf"  # the hub's "file absent" marker
    marker.parent.mkdir(parents=True)
    marker.touch()
    # A quantization in a subfolder shares the projector at the snapshot's top.
    tiny(repo / "blobs" / "cccc", seed=3)
    (repo / "snapshots" / "rev2" / "BF16").mkdir()
    (repo / "snapshots" / "rev2" / "BF16" / "Some-Model-BF16.gguf").symlink_to(
        "../../../blobs/cccc"
    )
    mmproj(repo / "blobs" / "dddd", gguf.LlamaFileType.MOSTLY_F16)
    (repo / "snapshots" / "rev2" / "mmproj-F16.gguf").symlink_to("../../blobs/dddd")

    result = scan_folders([tmp_path / "hub"])
    assert [m.id for m in result.models] == ["Some-Model-BF16", "Some-Model-Q4_K_M"]
    assert {m.mmproj for m in result.models} == {repo / "snapshots" / "rev2" / "mmproj-F16.gguf"}
    assert result.models[0].aliases == ("some-org/Some-Model-GGUF:BF16",)
    model = result.models[1]
    assert model.path == repo / "snapshots" / "rev2" / "Some-Model-Q4_K_M.gguf"
    assert model.size_bytes == new_blob.stat().st_size
    assert model.context_length == 8192
    assert model.repo == "some-org/Some-Model-GGUF"
    assert model.aliases == ("some-org/Some-Model-GGUF:Q4_K_M",)
    assert [(p.path.name, "broken symlink" in p.reason) for p in result.problems] == [
        ("gone.gguf", True)
    ]


def test_split_model_is_one_model_named_without_the_split_suffix(tmp_path: Path) -> None:
    write_gguf(tmp_path / "big.gguf", n_tensors=3, split_max_tensors=1, file_type=0)
    shards = sorted(tmp_path.glob("big-*-of-00003.gguf"))
    assert len(shards) == 3
    (model,) = scan([tmp_path])
    assert model.id == "big"
    assert model.path == tmp_path / "big-00001-of-00003.gguf"
    assert model.shards == tuple(shards)
    assert model.size_bytes == sum(p.stat().st_size for p in shards)
    assert model.parameter_count == 3 * 8 * 4
    assert model.quantization == "F32"


def test_incomplete_split_model_is_reported_and_not_served(tmp_path: Path) -> None:
    write_gguf(tmp_path / "big.gguf", n_tensors=3, split_max_tensors=1)
    (tmp_path / "big-00002-of-00003.gguf").unlink()
    tiny(tmp_path / "ok.gguf")
    result = scan_folders([tmp_path])
    assert [m.id for m in result.models] == ["ok"]
    (problem,) = result.problems
    assert problem.path == tmp_path / "big-00001-of-00003.gguf"
    assert "incomplete split model: 2 of 3 shards present (missing 00002)" in problem.reason


def test_each_model_gets_the_folders_mmproj_preferring_bf16_then_f16_then_f32(
    tmp_path: Path,
) -> None:
    ft = gguf.LlamaFileType
    tiny(tmp_path / "vision" / "model-a.gguf")
    tiny(tmp_path / "vision" / "model-b.gguf")
    mmproj(tmp_path / "vision" / "mmproj-model-f32.gguf", ft.ALL_F32)
    mmproj(tmp_path / "vision" / "mmproj-model-f16.gguf", ft.MOSTLY_F16)
    mmproj(tmp_path / "vision" / "projector.gguf", ft.MOSTLY_BF16)  # mmproj by metadata only
    tiny(tmp_path / "text" / "plain.gguf")
    catalog = Catalog([tmp_path])
    catalog.rescan()
    models = by_id(catalog.models)
    assert sorted(models) == ["model-a", "model-b", "plain"]  # projectors are never models
    assert models["model-a"].mmproj == tmp_path / "vision" / "projector.gguf"
    assert models["model-b"].mmproj == tmp_path / "vision" / "projector.gguf"
    assert models["plain"].mmproj is None

    (tmp_path / "vision" / "projector.gguf").unlink()
    change = catalog.rescan()
    assert {m.id for m in change.updated} == {"model-a", "model-b"}
    assert get(catalog, "model-a").mmproj == tmp_path / "vision" / "mmproj-model-f16.gguf"
    (tmp_path / "vision" / "mmproj-model-f16.gguf").unlink()
    catalog.rescan()
    assert get(catalog, "model-a").mmproj == tmp_path / "vision" / "mmproj-model-f32.gguf"


def test_mmproj_precision_comes_from_the_name_when_the_header_has_no_file_type(
    tmp_path: Path,
) -> None:
    tiny(tmp_path / "model.gguf")
    for name in ("mmproj-F32.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf"):
        write_gguf(tmp_path / name, arch="clip", kind="mmproj", dtype=np.float32)
    (model,) = scan([tmp_path])
    assert model.mmproj == tmp_path / "mmproj-BF16.gguf"


def test_ids_are_unique_with_a_folder_suffix_then_a_number_and_stay_stable(
    tmp_path: Path,
) -> None:
    tiny(tmp_path / "one" / "m.gguf")
    tiny(tmp_path / "one" / "m-two.gguf")
    tiny(tmp_path / "two" / "m.gguf")
    tiny(tmp_path / "zed" / "m.gguf")
    catalog = Catalog([tmp_path])
    catalog.rescan()
    paths = {m.id: parent_and_name(m, tmp_path) for m in catalog.models}
    assert paths == {
        "m": "one/m.gguf",
        "m-two": "one/m-two.gguf",
        "m-2": "two/m.gguf",
        "m-zed": "zed/m.gguf",
    }
    # A new file that sorts first does not take a name clients already use.
    tiny(tmp_path / "aaa" / "m.gguf")
    change = catalog.rescan()
    assert [(m.id, parent_and_name(m, tmp_path)) for m in change.added] == [("m-aaa", "aaa/m.gguf")]
    assert get(catalog, "m").path == tmp_path / "one" / "m.gguf"


def test_rescan_adds_new_files_and_removes_vanished_ones_but_never_manual_models(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "models"
    pinned = tiny(folder / "pinned.gguf")
    tiny(folder / "first.gguf")
    manual = {
        "mine": ModelConfig(path=pinned, aliases=["my-alias"], args=["--mmproj", "/x.gguf"]),
        "ghost": ModelConfig(path=tmp_path / "missing.gguf"),
    }
    catalog = Catalog([folder], manual)
    change = catalog.rescan()
    assert [m.id for m in change.added] == ["first"]  # pinned.gguf is served as "mine" only
    assert not catalog.changed()

    tiny(folder / "later" / "second.gguf")
    assert catalog.changed()
    change = catalog.rescan()
    assert [m.id for m in change.added] == ["second"] and not change.removed
    (folder / "first.gguf").unlink()
    pinned.unlink()
    change = catalog.rescan()
    assert [m.id for m in change.removed] == ["first"] and not change.added
    assert not catalog.rescan()  # nothing changed: an empty CatalogChange is falsy

    models = by_id(catalog.models)
    assert sorted(models) == ["ghost", "mine", "second"]
    mine = models["mine"]
    assert (mine.source, mine.architecture, mine.mmproj) == ("manual", "llama", Path("/x.gguf"))
    assert catalog.get("my-alias") is mine
    assert models["ghost"].source == "manual" and models["ghost"].architecture is None
    assert any(p.path == tmp_path / "missing.gguf" for p in catalog.problems)


def test_an_alias_pattern_names_a_model_after_every_exact_name(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    manual = {
        "chat": ModelConfig(path=tiny(folder / "chat.gguf"), aliases=["gpt-*"]),
        "code": ModelConfig(path=tiny(folder / "code.gguf"), aliases=["gpt-4o-code"]),
    }
    catalog = Catalog([], manual)
    models = by_id(catalog.models)
    assert catalog.get("gpt-3.5-turbo") is models["chat"]
    assert catalog.get("gpt-4o-code") is models["code"]  # exact beats the pattern
    assert catalog.get("claude") is None


def test_a_discovered_model_never_takes_a_manual_models_name(tmp_path: Path) -> None:
    tiny(tmp_path / "dir" / "chat.gguf")
    catalog = Catalog([tmp_path / "dir"], {"chat": ModelConfig(path=tmp_path / "other.gguf")})
    catalog.rescan()
    assert {m.id: m.source for m in catalog.models} == {"chat": "manual", "chat-dir": "auto"}


def test_bad_files_are_skipped_with_a_reason_and_the_scan_goes_on(tmp_path: Path) -> None:
    good = tiny(tmp_path / "good.gguf")
    (tmp_path / "text.gguf").write_text("hello, I am not a model")
    (tmp_path / "empty.gguf").touch()
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])  # an interrupted download
    (tmp_path / "header-cut.gguf").write_bytes(data[:200])
    hostile = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60)
    (tmp_path / "hostile.gguf").write_bytes(hostile)  # a key "2^60 bytes long"
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    os.mkfifo(tmp_path / "fifo.gguf")  # opening it to read would block forever

    result = scan_folders([tmp_path])
    assert [m.id for m in result.models] == ["good"]
    reasons = {p.path.name: p.reason for p in result.problems}
    assert reasons["text.gguf"].startswith("not a GGUF file")
    assert reasons["empty.gguf"] == "empty file"
    assert reasons["cut.gguf"].startswith("truncated: tensor data needs")
    assert "truncated" in reasons["header-cut.gguf"]
    assert "truncated" in reasons["hostile.gguf"]
    assert "version 1 is not supported" in reasons["v1.gguf"]
    assert reasons["fifo.gguf"] == "not a regular file"
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "text.gguf")


def test_a_missing_folder_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    result = scan_folders([tmp_path / "nope"])
    assert result.models == []
    assert [p.reason for p in result.problems] == ["not a folder (or it does not exist)"]


def test_signature_changes_when_a_file_is_added_replaced_or_removed(tmp_path: Path) -> None:
    path = tiny(tmp_path / "m.gguf")
    before = folder_signature([tmp_path])
    assert folder_signature([tmp_path]) == before
    tiny(path, seed=7, n_words=9)
    replaced = folder_signature([tmp_path])
    assert replaced != before
    path.unlink()
    assert folder_signature([tmp_path]) not in (before, replaced)


def test_default_folders_follow_llama_cpp_and_hugging_face(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("LLAMA_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform != "darwin":
        assert llama_cpp_cache_dir() == tmp_path / "xdg" / "llama.cpp"
    assert hf_hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "llama"))
    assert default_models_dirs() == [tmp_path / "llama", tmp_path / "hubcache"]


def test_models_list_searches_the_default_caches_that_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [k for k in os.environ if k.startswith("CORRAL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "llama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "not-downloaded-yet"))
    tiny(tmp_path / "llama" / "ggml-org_m-GGUF_m-Q8_0.gguf")
    assert main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listing["models"]] == ["ggml-org_m-GGUF_m-Q8_0"]
    assert listing["problems"] == []  # a default cache that doesn't exist is no problem


def test_models_list_marks_what_a_balancer_has_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny(tmp_path / "up.gguf")
    tiny(tmp_path / "down.gguf")
    fleet = {"instances": [{"model": "other", "aliases": ["up"], "state": "ready"}]}
    seen: list[str | None] = []

    class Fleet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = json.dumps(fleet).encode()
            self.send_response(200 if self.path == "/api/v1/fleet" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fleet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("CORRAL_MANAGEMENT_TOKEN", "sekrit")
        addr = f"127.0.0.1:{server.server_address[1]}"
        argv = ["models", "list", "--models-dir", str(tmp_path), "--json"]
        assert main([*argv, "--management-addr", addr]) == 0
    finally:
        server.shutdown()
        thread.join(timeout=10)
    listing = json.loads(capsys.readouterr().out)
    assert {m["id"]: m["loaded"] for m in listing["models"]} == {"down": "no", "up": "ready"}
    assert seen == ["Bearer sekrit"]


async def test_watch_rescans_when_a_model_appears(tmp_path: Path) -> None:
    catalog = Catalog([tmp_path])
    catalog.rescan()
    changes: list[CatalogChange] = []
    seen = asyncio.Event()

    def on_change(change: CatalogChange) -> None:
        changes.append(change)
        seen.set()

    stop = asyncio.Event()
    task = asyncio.create_task(watch(catalog, interval=0.01, on_change=on_change, stop=stop))
    await asyncio.to_thread(tiny, tmp_path / "new.gguf")
    await asyncio.wait_for(seen.wait(), timeout=10)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert [m.id for m in changes[0].added] == ["new"]
    assert catalog.get("new") is not None


# -- command line --------------------------------------------------------------------


def corral(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_models_list_prints_a_table_and_json_and_reports_bad_files(tmp_path: Path) -> None:
    tiny(tmp_path / "chat-model.gguf", n_ctx=2048)
    mmproj(tmp_path / "mmproj-f16.gguf", gguf.LlamaFileType.MOSTLY_F16)
    (tmp_path / "broken.gguf").write_text("nope")

    result = corral("models", "list", "--models-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "chat-model" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:11] == [
        "chat-model", cells[1], "F32", "2048", cells[4], "llama", "yes",
        "mmproj-f16.gguf", "auto", "-", "-",
    ]  # fmt: skip
    assert cells[1].endswith("KiB")
    assert f"skipped {tmp_path / 'broken.gguf'}: not a GGUF file" in result.stderr

    result = corral("models", "list", "--models-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    (model,) = listing["models"]
    assert model["id"] == "chat-model" and model["context_length"] == 2048
    assert model["mmproj"] == str(tmp_path / "mmproj-f16.gguf")
    assert [p["path"] for p in listing["problems"]] == [str(tmp_path / "broken.gguf")]

    missing = corral("models", "list", "--models-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_models_import_writes_new_models_into_a_config_and_keeps_existing_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "tree"
    kept = tiny(tree / "kept.gguf")
    tiny(tree / "vision" / "seer.gguf")
    mmproj(tree / "vision" / "mmproj-seer-f16.gguf", gguf.LlamaFileType.MOSTLY_F16)
    config = tmp_path / "corral.yaml"
    config.write_text(f"policy: round_robin\nmodels:\n  seer:\n    path: {kept}\n")

    assert main(["models", "import", str(tree)]) == 0  # no --write: print only
    assert "nothing written" in capsys.readouterr().err
    assert main(["models", "import", str(tree), "--write", str(config)]) == 0
    assert check_file(config) == []
    data = yaml.safe_load(config.read_text())
    assert data["policy"] == "round_robin"
    assert data["models"]["seer"] == {"path": str(kept)}  # existing entry untouched
    assert data["models"]["seer-vision"] == {  # new id avoids the existing one
        "path": str(tree / "vision" / "seer.gguf"),
        "args": ["--mmproj", str(tree / "vision" / "mmproj-seer-f16.gguf")],
    }
    assert "kept" not in data["models"]  # already served as "seer"
    assert main(["models", "import", str(tree), "--write", str(config)]) == 0
    assert "no new models" in capsys.readouterr().err
