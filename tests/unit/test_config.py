"""Configuration: one typed model filled from file < CORRAL_* environment < flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.config import ConfigError, Settings, check_file, json_schema, load_settings


def write(tmp_path: Path, text: str, name: str = "corral.yaml", bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings(environ={})
    assert settings.inference_addr == "127.0.0.1:8080"
    assert settings.management_addr == "127.0.0.1:8085"
    assert settings.policy == "least_busy"
    assert settings.max_buffered_requests == 30
    assert settings.buffered_request_timeout == 10.0


def test_flags_beat_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "policy: random\nmax_buffered_requests: 5\nbuffered_request_timeout: 2\n",
    )
    environ = {"CORRAL_POLICY": "round_robin", "CORRAL_MAX_BUFFERED_REQUESTS": "7"}
    settings = load_settings(path, environ=environ, overrides={"policy": "least_busy"})
    assert settings.policy == "least_busy"  # flag
    assert settings.max_buffered_requests == 7  # environment over file
    assert settings.buffered_request_timeout == 2.0  # file alone


def test_a_flag_left_unset_does_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, "policy: random\n")
    settings = load_settings(path, environ={}, overrides={"policy": None})
    assert settings.policy == "random"


def test_environment_lists_are_comma_separated() -> None:
    settings = load_settings(environ={"CORRAL_BALANCERS": "10.0.0.1:8085, 10.0.0.2:8085"})
    assert settings.balancers == ["10.0.0.1:8085", "10.0.0.2:8085"]


def test_corral_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "policy: round_robin\n")
    settings = load_settings(environ={"CORRAL_CONFIG": str(path)})
    assert settings.policy == "round_robin"


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "policy: random\n", bom=True)
    assert load_settings(path, environ={}).policy == "random"
    assert check_file(path) == []


def test_unknown_key_is_an_error_with_did_you_mean_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "# comment\ninference_addr: 127.0.0.1:9000\npolcy: random\n")
    issues = check_file(path)
    assert len(issues) == 1
    issue = issues[0]
    assert issue.field == "polcy"
    assert issue.line == 3
    assert "did you mean 'policy'" in issue.message


def test_typo_and_wrong_type_are_both_reported_with_field_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "max_bufered_requests: 3\nbuffered_request_timeout: soon\n",
    )
    issues = check_file(path)
    by_field = {i.field: i for i in issues}
    assert set(by_field) == {"max_bufered_requests", "buffered_request_timeout"}
    assert "did you mean 'max_buffered_requests'" in by_field["max_bufered_requests"].message
    assert by_field["max_bufered_requests"].line == 1
    assert by_field["buffered_request_timeout"].line == 2
    assert "'soon'" in by_field["buffered_request_timeout"].message


def test_nested_model_errors_name_the_model_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n  llama:\n    path: /m/llama.gguf\n    alises: [l]\n    ttl: -1\n",
    )
    issues = check_file(path)
    fields = {i.field: i for i in issues}
    assert "models.llama.alises" in fields
    assert "did you mean 'aliases'" in fields["models.llama.alises"].message
    assert fields["models.llama.alises"].line == 4
    assert "models.llama.ttl" in fields
    assert fields["models.llama.ttl"].line == 5


def test_bad_address_and_port_range_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "inference_addr: nowhere\nport_range: 9000-80\n")
    fields = {i.field for i in check_file(path)}
    assert fields == {"inference_addr", "port_range"}


def test_environment_errors_say_they_came_from_the_environment() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"CORRAL_MAX_BUFFERED_REQUESTS": "many"})
    (issue,) = caught.value.issues
    assert issue.source == "(environment)"
    assert issue.field == "max_buffered_requests"


def test_secrets_are_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, overrides={"management_token": 12345678})
    assert "12345678" not in str(caught.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "policy: random\nmodels: [unclosed\n")
    (issue,) = check_file(path)
    assert issue.line is not None and issue.line >= 2
    assert "not valid YAML" in issue.message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    (issue,) = check_file(path)
    assert "mapping" in issue.message


def test_secrets_do_not_appear_in_repr() -> None:
    settings = load_settings(environ={"CORRAL_MANAGEMENT_TOKEN": "s3cret-token"})
    assert "s3cret-token" not in repr(settings)
    assert settings.resolved_management_token() == "s3cret-token"


def test_management_token_file_is_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    settings = load_settings(environ={}, overrides={"management_token_file": token_file})
    assert settings.resolved_management_token() == "from-file"


def test_schema_lists_every_setting_with_a_description() -> None:
    schema = json.loads(json_schema())
    properties = schema["properties"]
    assert set(properties) == set(Settings.model_fields)
    missing = [name for name, prop in properties.items() if not prop.get("description")]
    assert missing == []


def test_the_balancer_lookup_interval_comes_from_flag_environment_or_file() -> None:
    from corral.cli import build_parser
    from corral.cli.launch import _agent_overrides

    assert load_settings(environ={}).balancer_dns_interval == 15.0
    env = load_settings(environ={"CORRAL_BALANCER_DNS_INTERVAL": "2.5"})
    assert env.balancer_dns_interval == 2.5
    args = build_parser().parse_args(["agent", "--balancer-dns-interval", "4"])
    flagged = load_settings(environ={}, overrides=_agent_overrides(args))
    assert flagged.balancer_dns_interval == 4.0
    with pytest.raises(ConfigError, match="balancer_dns_interval"):
        load_settings(environ={"CORRAL_BALANCER_DNS_INTERVAL": "0"})
