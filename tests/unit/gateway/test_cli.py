"""`sllm gateway start` settings: flags over environment, clear errors."""

from __future__ import annotations

import pytest

from sllm.errors import ValidationFailed
from sllm_cli.app import build_parser
from sllm_cli.gateway import settings_from_args


def parse(argv: list[str]):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["gateway", "start", *argv])


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLLM_TOKEN", "from-env")
    monkeypatch.setenv("SLLM_GATEWAY_PORT", "9000")
    settings = settings_from_args(parse(["--port", "9100", "--policy", "least-loaded"]))
    assert (settings.token, settings.port, settings.policy) == ("from-env", 9100, "least-loaded")


def test_a_token_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLLM_TOKEN", raising=False)
    with pytest.raises(ValidationFailed, match="SLLM_TOKEN is empty"):
        settings_from_args(parse([]))


@pytest.mark.parametrize(
    ("argv", "needle"), [(["--port", "0"], "--port"), (["--policy", "fastest"], "--policy")]
)
def test_bad_flags_name_the_flag(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], needle: str
) -> None:
    monkeypatch.setenv("SLLM_TOKEN", "t")
    with pytest.raises(ValidationFailed, match=needle):
        settings_from_args(parse(argv))
