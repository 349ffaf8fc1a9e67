"""The one name rule: what may become a path component, for clients' and manifests' names alike."""

from __future__ import annotations

import pytest

from ckptd.errors import ConfigError
from ckptd.names import check_file_name, check_name


@pytest.mark.parametrize("what", ["run", "tag", "model name"])
@pytest.mark.parametrize("bad", ["x\n", "step-1\n", "x\r\n", "a\nb"])
def test_a_trailing_or_inner_newline_is_refused(what: str, bad: str) -> None:
    with pytest.raises(ConfigError):
        check_name(bad, what)


@pytest.mark.parametrize(
    "run",
    ["checkpoints", "experiment", "latest", ".ckptd", "a/checkpoints", "a/checkpoints/b",
     "project/experiment/ts", "latest/x", "p/.ckptd"],
)  # fmt: skip
def test_run_parts_the_layout_reserves_are_refused(run: str) -> None:
    with pytest.raises(ConfigError, match=r"reserved|invalid"):
        check_name(run, "run")


def test_reserved_words_are_fine_inside_a_part() -> None:
    for run in ("my-checkpoints", "latest-run", "experiment1/x", "p/checkpoints2"):
        assert check_name(run, "run") == run


@pytest.mark.parametrize(
    "bad",
    ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\x00b", "a\tb", "a\x7fb", "a\x1bb", "é",
     "-x", ".hidden", "x.partial", "x.tmp-1", "a\\b", "x" * 201, "MANIFEST.json", "x\n"],
)  # fmt: skip
def test_file_names_from_manifests_are_one_plain_component(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_file_name(bad)


@pytest.mark.parametrize("bad", [None, 3, b"x", ["x"]])
def test_file_names_must_be_strings(bad: object) -> None:
    with pytest.raises(ConfigError):
        check_file_name(bad)


def test_real_file_names_pass() -> None:
    for name in ("model.weights.safetensors", "ema.optim.safetensors", "extra.msgpack",
                 "extra.safetensors", "shard-00000-of-00004.safetensors", "dcp-metadata.json"):  # fmt: skip
        assert check_file_name(name) == name
