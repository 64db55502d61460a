"""`sllm node start` refuses bad settings with one line naming the setting."""

from __future__ import annotations

import pytest

from sllm_cli.app import run


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--cpu-slots", "-1"], "SLLM_CPU_SLOTS='-1'"),
        (["--pool-size", "100"], "SLLM_POOL_SIZE='100'"),
        (["--pool-refill-after", "soon"], "SLLM_POOL_REFILL_AFTER='soon'"),
        (["--node-id", "Not_A_Label"], "SLLM_NODE_ID='Not_A_Label'"),
        (["--dram-capacity", "lots"], "SLLM_DRAM_CAPACITY='lots'"),
        (["--heartbeat", "0s"], "SLLM_HEARTBEAT_INTERVAL"),
        (["--store-bandwidth", "fast"], "SLLM_STORE_BANDWIDTH='fast'"),
        (["--drain", "soon"], "--drain"),
    ],
)
def test_bad_settings_exit_1_naming_the_setting(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["node", "start", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sllm: error: ") and needle in err
