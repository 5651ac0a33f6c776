"""Which files ``corral models pull ORG/REPO[:QUANT]`` takes from a repo's listing.

Pure rules, no hub; downloads through huggingface_hub against a fake hub are in
``tests/integration/test_pull.py``.
"""

from __future__ import annotations

import pytest

from corral.catalog.pull import PullError, parse_spec, select_files

REPO = "org/Model-GGUF"


def pick(files: list[str], quant: str | None = None, *, mmproj: bool = True) -> tuple[str, ...]:
    return select_files(files, quant, repo=REPO, mmproj=mmproj).files


def test_spec_is_repo_with_an_optional_quant() -> None:
    assert parse_spec("org/Model-GGUF") == ("org/Model-GGUF", None)
    assert parse_spec("org/Model-GGUF:q8_0") == ("org/Model-GGUF", "q8_0")
    assert parse_spec(" ggml-org/gemma-3-1b-it-GGUF:UD-Q4_K_XL ") == (
        "ggml-org/gemma-3-1b-it-GGUF",
        "UD-Q4_K_XL",
    )


@pytest.mark.parametrize(
    "spec",
    [
        "model-GGUF",  # no org
        "org/",
        "/name",
        "org/name/extra",
        "../../etc/passwd",
        "org/..",
        "org/a--b",  # the hub forbids '--': it is the cache's separator
        "org/name:",
        "org/name:Q4:K",
        "org/name:../../x",
        "org/na me",
        "-org/name",
        "",
    ],
)
def test_malformed_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="ORG/REPO"):
        parse_spec(spec)


def test_default_is_q4_k_m_then_q8_0_then_the_first_model() -> None:
    files = ["Model-BF16.gguf", "Model-Q8_0.gguf", "Model-Q4_K_M.gguf", "README.md"]
    assert pick(files) == ("Model-Q4_K_M.gguf",)
    assert pick(files[:2]) == ("Model-Q8_0.gguf",)
    assert pick(["Model-F16.gguf", "Model-BF16.gguf"]) == ("Model-BF16.gguf",)
    assert select_files(files, None, repo=REPO).tag == "Q4_K_M"


def test_quant_matches_the_tag_in_any_case_and_not_inside_a_longer_word() -> None:
    files = ["Model-Q4_K_M.gguf", "Model-IQ4_XS.gguf", "Model-Q8_0.gguf"]
    assert pick(files, "q8_0") == ("Model-Q8_0.gguf",)
    assert pick(files, "iq4_xs") == ("Model-IQ4_XS.gguf",)
    with pytest.raises(PullError, match="no Q4_XS model"):
        pick(files, "Q4_XS")  # inside IQ4_XS: not a match


def test_unknown_quant_lists_the_quants_the_repo_has() -> None:
    files = ["Model-Q4_K_M.gguf", "Model-Q8_0.gguf", "mmproj-F16.gguf", "Model-imatrix.gguf"]
    with pytest.raises(PullError) as caught:
        pick(files, "Q5_K_S")
    assert str(caught.value) == f"{REPO} has no Q5_K_S model; available: Q4_K_M, Q8_0"


def test_several_matches_are_an_error_naming_each_by_the_spec_that_picks_it() -> None:
    files = ["Model-Q4_K_XL.gguf", "Model-UD-Q4_K_XL.gguf"]
    with pytest.raises(PullError) as caught:
        pick(files, "Q4_K_XL")
    message = str(caught.value)
    assert message.startswith(f"Q4_K_XL matches 2 models in {REPO}; pick one: ")
    assert f"{REPO}:Model-Q4_K_XL (Model-Q4_K_XL.gguf)" in message
    assert f"{REPO}:Model-UD-Q4_K_XL (Model-UD-Q4_K_XL.gguf)" in message
    # ... and each of those picks its file:
    assert pick(files, "Model-Q4_K_XL") == ("Model-Q4_K_XL.gguf",)
    assert pick(files, "UD-Q4_K_XL") == ("Model-UD-Q4_K_XL.gguf",)
    assert pick(files, "model-ud-q4_k_xl.gguf") == ("Model-UD-Q4_K_XL.gguf",)


def test_a_split_model_is_every_shard_in_order_also_from_a_quant_folder() -> None:
    shards = [f"Q8_0/Model-Q8_0-{i:05d}-of-00003.gguf" for i in (3, 1, 2)]
    files = [*shards, "Model-Q4_K_M.gguf"]
    assert pick(files, "Q8_0") == tuple(sorted(shards))
    selection = select_files(files, "Q8_0", repo=REPO)
    assert selection.tag == "Q8_0"


def test_a_split_model_missing_shards_in_the_listing_is_refused() -> None:
    files = ["Model-Q8_0-00001-of-00003.gguf", "Model-Q8_0-00003-of-00003.gguf"]
    with pytest.raises(PullError, match="lists 2 of 3 shards"):
        pick(files, "Q8_0")


def test_mmproj_prefers_bf16_then_f16_then_f32_and_the_nearest_folder() -> None:
    # names sorted against the preference, so only the precision can decide
    files = ["Model-Q4_K_M.gguf", "mmproj-a-Q8_0.gguf", "mmproj-b-F32.gguf", "mmproj-c-F16.gguf"]
    files.append("mmproj-d-BF16.gguf")
    assert pick(files) == ("Model-Q4_K_M.gguf", "mmproj-d-BF16.gguf")
    assert pick(files[:4]) == ("Model-Q4_K_M.gguf", "mmproj-c-F16.gguf")
    assert pick(files[:3]) == ("Model-Q4_K_M.gguf", "mmproj-b-F32.gguf")
    assert pick(files[:2]) == ("Model-Q4_K_M.gguf", "mmproj-a-Q8_0.gguf")
    assert pick(files, mmproj=False) == ("Model-Q4_K_M.gguf",)
    nested = ["Q4/Model-Q4_K_M.gguf", "Q4/mmproj-F32.gguf", "mmproj-BF16.gguf"]
    nested.append("x/mmproj-BF16.gguf")  # another folder's: never
    assert pick(nested) == ("Q4/Model-Q4_K_M.gguf", "Q4/mmproj-F32.gguf")
    assert pick([n for n in nested if n != "Q4/mmproj-F32.gguf"])[1] == "mmproj-BF16.gguf"


def test_companions_are_never_the_model() -> None:
    files = ["mtp-Model-Q4_K_M.gguf", "Model-Q4_K_M.imatrix.gguf", "Model-Q8_0.gguf"]
    assert pick(files) == ("Model-Q8_0.gguf",)
    with pytest.raises(PullError, match="has no GGUF model files: only projectors"):
        pick(["mmproj-F16.gguf"])
    with pytest.raises(PullError, match="none among its 2 file"):
        pick(["model.safetensors", "config.json"])


def test_listed_paths_that_leave_the_snapshot_are_ignored() -> None:
    files = ["../Model-Q4_K_M.gguf", "/abs/Model-Q4_K_M.gguf", "a\\..\\b-Q4_K_M.gguf"]
    with pytest.raises(PullError, match="has no GGUF model files"):
        pick(files)
    assert pick([*files, "ok/Model-Q4_K_M.gguf", "../mmproj-BF16.gguf"]) == (
        "ok/Model-Q4_K_M.gguf",
    )
