"""Per-request flags: normalization and the allow-list."""

from __future__ import annotations

import pytest

from corral.supervisor.request_flags import RequestFlagError, normalize


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("-c 8192", "--ctx-size 8192"),
        ("--ctx-size=8192", "-c 8192"),
        ("-fa", "--flash-attn on"),
        ("-fa on -c 4096", "-c 4096 --flash-attn=on"),
        ("--temp 0.50 --top-k 40", "--top-k 40 --temp .5"),
        ("-c 2048 -c 4096", "-c 4096"),
        ("-ctk q8_0 -ctv Q8_0", "--cache-type-v q8_0 --cache-type-k q8_0"),
        ("--temp 1", "--temperature 1.0"),
        ("--seed -1", "-s -1"),
    ],
)
def test_spellings_that_mean_the_same_normalize_alike(a: str, b: str) -> None:
    assert normalize(a) == normalize(b)


def test_normal_form_is_sorted_long_names_with_values() -> None:
    assert normalize("-fa -c 8192 --temp 0.2") == (
        "--ctx-size", "8192", "--flash-attn", "on", "--temp", "0.2",
    )  # fmt: skip
    assert normalize("") == ()


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ("-m /etc/passwd", "-m"),
        ("--model x.gguf", "--model"),
        ("--host 0.0.0.0", "--host"),
        ("--port 1", "--port"),
        ("--api-key k", "--api-key"),
        ("--slot-save-path /tmp", "--slot-save-path"),
        ("--lora a.gguf", "--lora"),
        ("--some-new-flag 3", "--some-new-flag"),
        ("-c 4096 --alias x", "--alias"),
    ],
)
def test_unsafe_or_unknown_flags_are_refused_by_name(raw: str, named: str) -> None:
    with pytest.raises(RequestFlagError, match=f"flag {named} is not allowed"):
        normalize(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("-c lots", "bad value"),
        ("-c", "needs a value"),
        ("--temp nan", "bad value"),
        ("-fa maybe", "bad value"),
        ("8192", "expected a flag"),
        ("--swa-full=1", "takes no value"),
        ("-c '4096", "cannot split"),
        ("-c 1 " * 300, "longer than"),
    ],
)
def test_bad_values_are_refused_with_a_reason(raw: str, message: str) -> None:
    with pytest.raises(RequestFlagError, match=message):
        normalize(raw)


@pytest.mark.parametrize(
    ("raw", "named", "allowed"),
    [
        ("-np 512", "-np", "1 to 256"),
        ("--parallel 0", "--parallel", "1 to 256"),
        ("-c -5", "-c", "0 to 16777216"),
        ("-c 99999999999999999999999", "-c", "0 to 16777216"),
        ("--mirostat 3", "--mirostat", "0 to 2"),
        ("--top-p 1.5", "--top-p", "0 to 1"),
        ("-b 0", "-b", "1 to 131072"),
        ("--seed 4294967296", "--seed", "-1 to 4294967295"),
        ("--repeat-penalty 1e39", "--repeat-penalty", "allowed"),
        ("--top-k 2147483648", "--top-k", "0 to 2147483647"),
    ],
)
def test_flag_values_out_of_range_are_refused_naming_the_flag_and_range(
    raw: str, named: str, allowed: str
) -> None:
    with pytest.raises(RequestFlagError) as caught:
        normalize(raw)
    assert f"flag {named}:" in str(caught.value)
    assert allowed in str(caught.value)


def test_values_at_the_edges_of_their_ranges_pass() -> None:
    assert normalize("-np 256 -c 0 --seed -1 --mirostat 2 --top-p 1") == (
        "--ctx-size", "0", "--mirostat", "2", "--parallel", "256", "--seed", "-1", "--top-p", "1",
    )  # fmt: skip
