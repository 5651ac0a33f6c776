"""``corral config import-llama-swap``: a llama-swap config converts into corral's."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.cli import main
from corral.config import ModelFilters, load_settings

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
      strip_params: "temperature"  # the older name, which llama-swap still reads
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
    assert vllm.use_model_name == "some/model"
    assert gemma.filters is not None and gemma.filters.strip_params == ["temperature"]
    warnings = capsys.readouterr().err
    assert "not llama-server" not in warnings
    assert "models.vllm: unknown macro(s) nomacro" in warnings
    assert "useModelName" not in warnings and "filters" not in warnings  # they converted
    assert "checkEndpoint" not in warnings  # it converted
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


#: llama-swap's current (v250) layout: per-model macros, routing.router, filters ...
LLAMA_SWAP_V250 = """
healthCheckTimeout: 60
startPort: 12000
sendLoadingState: true
globalTTL: 600
unloadTimeout: 20
captureBuffer: 8
apiKeys:
  - sk-plain-secret-1
  - ${env.CORRAL_TEST_KEY}
  - ${env.CORRAL_TEST_NO_KEY}
macros:
  bin: /srv/llama/llama-server
  base: ${bin} --port ${PORT}
  ctx: 2048
  weights: ${env.CORRAL_TEST_WEIGHTS}
models:
  coder:
    macros:
      ctx: 32768
      top_k: 20
      min_p: 0.05
    cmd: |
      ${base}
      -m ${weights}/coder.gguf
      -c ${ctx} --top-k ${top_k}
    name: Coder
    sendLoadingState: false
    ttl: 120
    unloadTimeout: 45
    concurrencyLimit: 3
    useModelName: org/coder-v2
    filters:
      stripParams: " temperature ,top_p, model,,"
      setParams:
        min_p: ${min_p}
        stop: ["</s>"]
        response_format: {type: json_object}
        model: other
      setParamsByID:
        "${MODEL_ID}":
          reasoning_budget: 0
        "${MODEL_ID}:think":
          chat_template_kwargs: {enable_thinking: true}
  chat:
    cmd: ${base} -m /srv/models/chat.gguf -c ${ctx}
    description: a chat model
    ttl: 0
    unloadTimeout: 0
    concurrencyLimit: 0
    cmdStop: kill ${PID}
    metadata: {size: small}
  embed:
    cmd: ${base} -m /srv/models/embed.gguf --embedding
    ttl: -1
    env: ["HF_HOME=${env.CORRAL_TEST_NO_DIR}"]
routing:
  router:
    use: group
    settings:
      groups:
        big:
          swap: true
          exclusive: false
          members: [coder, chat]
        side:
          swap: false
          exclusive: false
          persistent: true
          members: [embed]
  scheduler:
    use: fifo
    settings:
      fifo:
        priority: {coder: 5}
peers:
  remote:
    proxy: http://10.0.0.2:8080
    models: [far]
"""


def test_a_llama_swap_v250_config_converts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_TEST_KEY", "sk-from-the-env-2")
    monkeypatch.setenv("CORRAL_TEST_WEIGHTS", "/srv/weights")
    monkeypatch.delenv("CORRAL_TEST_NO_KEY", raising=False)
    monkeypatch.delenv("CORRAL_TEST_NO_DIR", raising=False)
    source = tmp_path / "config.yaml"
    source.write_text(LLAMA_SWAP_V250)
    target = tmp_path / "corral.yaml"
    assert main(["config", "import-llama-swap", str(source), "--write", str(target)]) == 0
    settings = load_settings(target, environ={})
    assert settings.startup_timeout == 60 and settings.port_range == "12000-12199"
    assert settings.loading_notices is True
    assert settings.model_ttl == 600 and settings.stop_grace == 20
    # the unset ${env.CORRAL_TEST_NO_KEY} is skipped, the set one read at import
    assert settings.resolved_api_keys() == ["sk-plain-secret-1", "sk-from-the-env-2"]
    assert sorted(settings.models) == ["chat", "coder", "embed"]
    coder = settings.models["coder"]
    assert coder.path == Path("/srv/weights/coder.gguf")  # ${env.*} in a global macro
    assert coder.args == ["-c", "32768", "--top-k", "20"]  # its own macros win
    assert coder.loading_notices is False and coder.ttl == 120 and coder.stop_grace == 45
    assert coder.use_model_name == "org/coder-v2" and coder.group == "big"
    assert coder.filters == ModelFilters(
        strip_params=["temperature", "top_p"],
        set_params={"min_p": 0.05, "stop": ["</s>"], "response_format": {"type": "json_object"}},
        set_params_by_name={
            "coder": {"reasoning_budget": 0},
            "coder:think": {"chat_template_kwargs": {"enable_thinking": True}},
        },
    )
    chat = settings.models["chat"]
    assert chat.args == ["-c", "2048"] and chat.group == "big"  # the global ctx
    assert chat.ttl is None and chat.stop_grace is None and chat.loading_notices is None
    embed = settings.models["embed"]
    assert embed.ttl is None and embed.group == "side"  # ttl -1: the global one
    assert embed.env == {"HF_HOME": "${env.CORRAL_TEST_NO_DIR}"}  # left as it is
    assert settings.groups["big"].exclusive and not settings.groups["big"].persistent
    assert not settings.groups["side"].exclusive and settings.groups["side"].persistent
    err = capsys.readouterr().err
    warnings = [line.removeprefix("warning: ") for line in err.splitlines()]
    warnings = [w for w in warnings if not w.startswith("wrote ")]
    # each dropped key once, nothing for what converted
    assert [w.split(": ")[0] for w in warnings] == [
        "apiKeys[2]",
        "models.coder.filters.stripParams",
        "models.coder.filters.setParams",
        "models.coder.concurrencyLimit",
        "models.chat.ttl",
        "models.chat.cmdStop",
        "models.chat.metadata",
        "models.embed.env",
        "routing.scheduler.settings.fifo.priority",
        "captureBuffer",
        "peers",
    ]
    by_key = {w.split(": ")[0]: w for w in warnings}
    assert "CORRAL_TEST_NO_KEY is not set" in by_key["apiKeys[2]"]
    assert "set CORRAL_API_KEYS" in by_key["apiKeys[2]"]
    assert "`model` is never stripped" in by_key["models.coder.filters.stripParams"]
    assert "`model` is never set" in by_key["models.coder.filters.setParams"]
    assert by_key["models.coder.concurrencyLimit"].startswith(
        "models.coder.concurrencyLimit: 3: corral has no per-model request cap; it admits as "
        "many requests at once as the instance has slots (llama-server --parallel) and "
        "buffers up to max_buffered_requests more (then 429)"
    )
    assert "model_ttl is set (600 s" in by_key["models.chat.ttl"]
    assert "SIGKILL after stop_grace" in by_key["models.chat.cmdStop"]
    assert "${env.CORRAL_TEST_NO_DIR} not set in the environment" in by_key["models.embed.env"]
    assert "first in, first out" in by_key["routing.scheduler.settings.fifo.priority"]
    assert "sk-plain-secret-1" not in err and "sk-from-the-env-2" not in err  # no key shown


def test_routing_that_is_not_groups_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "config.yaml"
    source.write_text(
        "globalTTL: 0\n"
        "unloadTimeout: 0\n"
        "sendLoadingState: false\n"
        "models:\n"
        "  a:\n"
        "    cmd: llama-server --port ${PORT} -m /m/a.gguf\n"
        "  b:\n"
        "    cmd: llama-server --port ${PORT} -m /m/b.gguf\n"
        "routing:\n"
        "  router:\n"
        "    use: matrix\n"
        "    settings:\n"
        "      groups:\n"
        "        g: {members: [a, b]}\n"
        "      matrix:\n"
        "        sets: {both: a & b}\n"
        "  scheduler: {use: fifo}\n"
    )
    target = tmp_path / "corral.yaml"
    assert main(["config", "import-llama-swap", str(source), "--write", str(target)]) == 0
    settings = load_settings(target, environ={})
    assert settings.groups == {} and settings.models["a"].group is None  # unused by matrix
    assert settings.model_ttl is None and settings.stop_grace == 10  # 0: never; the default
    assert settings.loading_notices is False and settings.api_keys == []
    warnings = capsys.readouterr().err
    assert "routing.router.use: 'matrix': corral has no such router; corral evicts by " in (
        warnings
    )
    assert "routing.router.settings.groups: not converted" in warnings
    assert "routing.router.settings.matrix: corral has no matrix" in warnings
    assert "scheduler" not in warnings  # fifo is what corral does
    assert "globalTTL" not in warnings and "unloadTimeout" not in warnings
