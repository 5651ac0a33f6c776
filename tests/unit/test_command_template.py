"""Command templates: parsing, substitution, validation, and the generic agent reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corral.agent import AgentOptions, Reading, generic_instance
from corral.catalog.discovery import manual_model
from corral.cli import _needs_llama_server, main
from corral.config import ConfigError, ModelConfig, Settings, load_settings
from corral.supervisor.managed import ManagedInstance, ManagedOptions
from corral.template import (
    TemplateError,
    placeholders,
    split_command,
    substitute,
    unknown_placeholders,
)

VALUES = {
    "host": "127.0.0.1",
    "port": "5801",
    "model_id": "qwen",
    "model_path": "Qwen/Qwen2.5-0.5B",
    "mmproj": "/m/proj.gguf",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corral.yaml"
    path.write_text(text)
    return path


# -- the template itself ---------------------------------------------------------------


def test_a_string_command_splits_like_shell_words_and_expands_nothing() -> None:
    assert split_command("vllm serve '${model_path}' --port ${port} \"a b\" $HOME ~ *") == [
        "vllm", "serve", "${model_path}", "--port", "${port}", "a b", "$HOME", "~", "*",
    ]  # fmt: skip
    assert split_command(["a", "b c"]) == ["a", "b c"]
    with pytest.raises(TemplateError, match="cannot split"):
        split_command("vllm 'unclosed")


def test_every_placeholder_is_filled_and_an_escaped_one_stays_literal() -> None:
    template = [
        "srv", "--host=${host}", "--port", "${port}", "--name", "${model_id}",
        "${model_path}", "--proj", "${mmproj}", "$${port}", "cost$5", "${port}${port}",
    ]  # fmt: skip
    assert substitute(template, VALUES) == [
        "srv", "--host=127.0.0.1", "--port", "5801", "--name", "qwen",
        "Qwen/Qwen2.5-0.5B", "--proj", "/m/proj.gguf", "${port}", "cost$5", "58015801",
    ]  # fmt: skip
    assert placeholders("$${port}-${host}") == ["host"]


def test_an_unknown_or_valueless_placeholder_is_refused() -> None:
    assert unknown_placeholders("--x=${PORT}${port}${}") == ["PORT", ""]
    with pytest.raises(TemplateError, match=r"unknown placeholder \$\{PORT\}"):
        substitute(["--port", "${PORT}"], VALUES)
    with pytest.raises(TemplateError, match=r"\$\{mmproj\} has no value"):
        substitute(["--proj", "${mmproj}"], {"port": "1"})


# -- in the configuration ------------------------------------------------------------------


def test_a_command_model_takes_a_string_or_a_list_with_documented_defaults(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "models:\n"
        "  a:\n"
        "    cmd: vllm serve ${model_path} --port ${port} --served-model-name ${model_id}\n"
        "    path: Qwen/Qwen2.5-0.5B\n"
        "  b:\n"
        "    cmd: [sglang, --port, '${port}', --host, '${host}']\n"
        "    health_path: /v1/models\n"
        "    paths: [/v1/chat/, /generate]\n"
        "    slots: 16\n",
    )
    models = load_settings(path, environ={}).models
    a, b = models["a"], models["b"]
    assert a.cmd == [
        "vllm", "serve", "${model_path}", "--port", "${port}", "--served-model-name", "${model_id}",
    ]  # fmt: skip
    assert (a.health_path, a.paths, a.slots) == ("/health", ["/v1/"], 4)
    assert a.path == Path("Qwen/Qwen2.5-0.5B")
    assert b.cmd == ["sglang", "--port", "${port}", "--host", "${host}"]
    assert (b.health_path, b.paths, b.slots) == ("/v1/models", ["/v1/chat/", "/generate"], 16)
    assert ModelConfig(path=Path("/m.gguf")).cmd is None  # llama-server by default


def test_an_unknown_placeholder_is_named_with_the_line_of_its_argument(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n  a:\n    cmd:\n      - vllm\n      - --port\n      - ${PORT}\n"
        "  b:\n    cmd: vllm --port ${port} --x ${modelpath}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    first, second = (str(issue) for issue in caught.value.issues)
    assert first.startswith(f"{path}:6: models.a.cmd.2: ")
    assert "unknown placeholder ${PORT}" in first and "${port}" in first
    assert second.startswith(f"{path}:8: models.b.cmd.4: ")
    assert "unknown placeholder ${modelpath}" in second


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("cmd: [vllm, serve]", "never uses ${port}"),
        ("cmd: []", "give the program to run"),
        ("cmd: ''", "give the program to run"),
        ("cmd: vllm serve ${model_path} --port ${port}", "uses ${model_path} but path is not"),
        ("cmd: srv --port ${port} --mmproj ${mmproj}", "uses ${mmproj} but mmproj is not set"),
        ("{cmd: 'srv --port ${port}', args: [-c, '4096']}", "takes its arguments in cmd"),
        ("{path: /m.gguf, slots: 3}", "slots only apply to a model started from cmd"),
        ("{path: /m.gguf, health_path: /h, paths: [/v1/]}", "health_path, paths only apply"),
        ("{cmd: 'srv --port ${port}', health_path: health}", "a URL path starting with /"),
        ("{cmd: 'srv --port ${port}', paths: []}", "at least 1 item"),
        ("{cmd: 'srv --port ${port}', slots: 0}", "greater than or equal to 1"),
        ('cmd: "srv \'unclosed"', "cannot split the command"),
    ],
)
def test_a_bad_command_model_is_a_config_error_with_its_line(
    tmp_path: Path, entry: str, message: str
) -> None:
    body = f"  m: {entry}\n" if entry.startswith("{") else f"  m:\n    {entry}\n"
    path = write(tmp_path, "policy: random\nmodels:\n" + body)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    (issue,) = caught.value.issues
    assert issue.field.startswith("models.m") and message in issue.message
    assert issue.line in (3, 4)


def test_corral_config_check_validates_command_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, "models:\n  v:\n    cmd: vllm serve org/m --port ${port}\n")
    assert main(["config", "check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  v:\n    cmd: vllm serve org/m --port ${Port}\n")
    assert main(["config", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:3: models.v.cmd.4:" in out and "unknown placeholder ${Port}" in out


def test_a_command_model_path_need_not_be_a_file(tmp_path: Path) -> None:
    config = ModelConfig(path=Path("Qwen/Qwen2.5-0.5B"), cmd=["vllm", "serve", "${port}"])
    model, problem = manual_model("q", config)
    assert problem is None and model.path == Path("Qwen/Qwen2.5-0.5B") and model.size_bytes == 0
    # the same path for a llama-server model is a missing file: a problem
    _, problem = manual_model("q", ModelConfig(path=Path("Qwen/Qwen2.5-0.5B")))
    assert problem is not None


def test_serve_needs_llama_server_unless_every_model_runs_a_command() -> None:
    command = ModelConfig(cmd=["vllm", "--port", "${port}"])
    gguf = ModelConfig(path=Path("/m.gguf"))
    only_commands = Settings(models={"a": command})
    assert not _needs_llama_server(only_commands, None, [])
    assert _needs_llama_server(only_commands, Path("/m.gguf"), [])  # --model
    assert _needs_llama_server(only_commands, None, [Path("/models")])  # --models-dir
    assert _needs_llama_server(Settings(models={"a": command, "b": gguf}), None, [])
    assert _needs_llama_server(Settings(), None, [])  # the caches' GGUF models


# -- the supervised process and its agent --------------------------------------------------


def managed(tmp_path: Path, **overrides: object) -> ManagedInstance:
    options = ManagedOptions(
        binary=tmp_path / "llama-server",
        model=None,
        model_id="qwen",
        port=5801,
        balancers=["127.0.0.1:1"],
        cluster_token="t",
        command=["vllm", "serve", "${model_path}", "--host", "${host}", "--port", "${port}"],
        template_values={"model_path": "Qwen/Qwen2.5-0.5B"},
        health_path="/v1/models",
        slots=8,
    )
    for key, value in overrides.items():
        setattr(options, key, value)
    return ManagedInstance(options)


def test_a_managed_command_starts_the_filled_template_and_watches_it_as_generic(
    tmp_path: Path,
) -> None:
    instance = managed(tmp_path)
    assert instance.supervisor.args == [
        "vllm", "serve", "Qwen/Qwen2.5-0.5B", "--host", "127.0.0.1", "--port", "5801",
    ]  # fmt: skip
    assert instance.supervisor.health_url == "http://127.0.0.1:5801/v1/models"
    assert instance.supervisor.name == "vllm:qwen"
    options = instance.agent.options
    assert (options.server_kind, options.health_path, options.slots) == ("generic", "/v1/models", 8)
    assert options.model_name == "qwen"


async def test_reconfigure_with_llama_server_arguments_is_refused_for_a_command(
    tmp_path: Path,
) -> None:
    result = await managed(tmp_path).command("reconfigure", {"args": ["-c", "1024"]})
    assert not result["ok"] and "models.qwen.cmd" in result["detail"]


def test_a_command_without_a_model_file_needs_a_model_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model id"):
        managed(tmp_path, model_id=None)


def test_a_generic_server_is_read_from_its_health_alone() -> None:
    def read(health: Reading) -> dict[str, object]:
        return generic_instance(
            instance_id="0",
            url="http://127.0.0.1:5801",
            model="qwen",
            slots=8,
            health=health,
            health_path="/v1/models",
        )

    ready = read(Reading.ok({"data": []}))
    assert ready["state"] == "ready" and ready["issues"] == []
    assert (ready["model"], ready["total_slots"], ready["busy"]) == ("qwen", 8, 0)
    down = read(Reading(error="connection refused"))
    assert down["state"] == "failed" and down["total_slots"] == 8
    assert "GET /v1/models" in str(down["issues"])
    erring = read(Reading(status=500, body=b'{"error": {"message": "engine dead"}}'))
    assert erring["issues"] == [
        {"kind": "server_error", "message": "GET /v1/models answered HTTP 500: engine dead"}
    ]


def test_a_generic_agent_must_be_told_its_model_and_slots() -> None:
    def options(**kwargs: Any) -> AgentOptions:
        return AgentOptions("http://127.0.0.1:1", ["h:1"], "t", server_kind="generic", **kwargs)

    with pytest.raises(ValueError, match="model_name"):
        options()
    with pytest.raises(ValueError, match="slots"):
        options(model_name="m", slots=0)
    with pytest.raises(ValueError, match="health_path"):
        options(model_name="m", health_path="health")
    assert options(model_name="m").slots == 4
