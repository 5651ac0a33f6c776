"""``corral config import-llama-swap``: a llama-swap config converts into corral's."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.cli import main
from corral.config import load_settings

LLAMA_SWAP = """
healthCheckTimeout: 90
startPort: 10001
logLevel: info
macros:
  server: /opt/llama/llama-server --port ${PORT} --host 127.0.0.1
  common: ${server} -ngl 99 --jinja
models:
  "qwen":
    cmd: |
      # comment lines are allowed
      ${common}
      --model /models/qwen.gguf
      --alias qwen-latest
      -c 8192
    aliases: [gpt-4o-mini]
    ttl: 300
    env: ["CUDA_VISIBLE_DEVICES=0"]
    proxy: http://127.0.0.1:${PORT}
  "gemma":
    cmd: ${common} -m /models/gemma.gguf --mmproj /models/mmproj-gemma.gguf
    unlisted: true
    filters:
      strip_params: "temperature"
  "vllm":
    cmd: vllm serve some/model --port ${PORT} --served-model-name ${MODEL_ID} --x ${nomacro}
    checkEndpoint: /v1/models
    useModelName: some/model
    aliases: [v]
groups:
  main:
    swap: true
    exclusive: true
    members: [qwen, gemma]
hooks:
  on_startup:
    preload: [qwen]
"""


def test_a_llama_swap_config_converts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "config.yaml"
    source.write_text(LLAMA_SWAP)
    target = tmp_path / "corral.yaml"
    assert main(["config", "import-llama-swap", str(source), "--write", str(target)]) == 0
    settings = load_settings(target, environ={})
    assert settings.startup_timeout == 90 and settings.port_range == "10001-10200"
    assert sorted(settings.models) == ["gemma", "qwen", "vllm"]
    qwen = settings.models["qwen"]
    assert qwen.path == Path("/models/qwen.gguf")
    assert qwen.args == ["-ngl", "99", "--jinja", "-c", "8192"]  # no --port, --host, -m
    assert qwen.aliases == ["gpt-4o-mini", "qwen-latest"]
    assert qwen.ttl == 300 and qwen.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert qwen.preload and qwen.group == "main"
    gemma = settings.models["gemma"]
    assert gemma.mmproj == Path("/models/mmproj-gemma.gguf") and gemma.unlisted
    assert settings.groups["main"].exclusive and not settings.groups["main"].persistent
    vllm = settings.models["vllm"]  # another server: a command template
    assert vllm.cmd == [
        "vllm", "serve", "some/model", "--port", "${port}", "--served-model-name", "vllm",
        "--x", "$${nomacro}",  # an unknown macro stays literal, escaped
    ]  # fmt: skip
    assert vllm.health_path == "/v1/models" and vllm.paths == ["/v1/"] and vllm.slots == 4
    assert vllm.aliases == ["v"] and vllm.path is None and vllm.args == []
    warnings = capsys.readouterr().err
    assert "not llama-server" not in warnings
    assert "models.vllm: unknown macro(s) nomacro" in warnings
    assert "models.vllm.useModelName: no equivalent" in warnings
    assert "--served-model-name" in warnings
    assert "checkEndpoint" not in warnings  # it converted
    assert "models.gemma.filters: no equivalent" in warnings
    assert "groups.main.exclusive" in warnings
    assert "logLevel" not in warnings  # a logging setting: nothing to warn about


def test_a_llama_server_without_a_model_file_becomes_a_command_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "config.yaml"
    source.write_text(
        "models:\n"
        "  hf:\n"
        "    cmd: llama-server -hf org/repo --port ${PORT} -np 2\n"
        "    checkEndpoint: none\n"
        "  fixed:\n"
        "    cmd: some-server --port 9000\n"
    )
    target = tmp_path / "corral.yaml"
    assert main(["config", "import-llama-swap", str(source), "--write", str(target)]) == 0
    settings = load_settings(target, environ={})
    hf = settings.models["hf"]
    assert hf.cmd == ["llama-server", "-hf", "org/repo", "--port", "${port}", "-np", "2"]
    assert hf.paths == ["/"] and hf.slots == 2 and hf.health_path == "/health"
    assert "fixed" not in settings.models
    warnings = capsys.readouterr().err
    assert "models.hf: llama-server without a model file (-m) runs as a command template" in (
        warnings
    )
    assert "models.hf.checkEndpoint: 'none'" in warnings
    assert "models.fixed: cmd never uses ${PORT}" in warnings
