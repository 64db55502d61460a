"""sllm_cli.netns, the pure parts: tc rates, the qdiscs a shape becomes, and bad input."""

from __future__ import annotations

import pytest

from sllm.errors import ValidationFailed
from sllm_cli import netns


@pytest.mark.parametrize(
    ("rate", "bytes_per_s"),
    [("100mbit", 12.5e6), ("1gbit", 125e6), ("40mbit", 5e6), ("12500kbps", 12.5e6)],
)
def test_rates_are_tc_rates(rate: str, bytes_per_s: float) -> None:
    assert netns.rate_bytes_per_s(rate) == pytest.approx(bytes_per_s)


def test_a_rate_becomes_a_tbf_with_a_burst_that_holds_a_gso_segment() -> None:
    (cmd,) = netns.shape_commands("eth0", netns.LinkShape("100mbit"))
    assert cmd[:5] == ["qdisc", "add", "dev", "eth0", "root"] and "tbf" in cmd
    assert int(cmd[cmd.index("burst") + 1]) >= 64 * 1024  # 64 KiB: one GSO segment
    slow = netns.shape_commands("eth0", netns.LinkShape("1mbit"))[0]
    assert int(slow[slow.index("burst") + 1]) == 64 * 1024


def test_delay_puts_netem_at_the_root_and_tbf_under_it() -> None:
    netem, tbf = netns.shape_commands("v0", netns.LinkShape("1gbit", delay_ms=2.0))
    assert "netem" in netem and netem[netem.index("delay") + 1] == "2.0ms"
    assert tbf[4:6] == ["parent", "1:1"]
    assert netns.shape_commands("v0", netns.LinkShape()) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: netns.LinkShape("fast"), "want a tc rate"),
        (lambda: netns.LinkShape("1gbit", delay_ms=-1), "delay -1"),
        (lambda: netns.create(["a", "a"], netns.LinkShape()), "distinct"),
        (lambda: netns.create(["Node_1"], netns.LinkShape()), "host name"),
    ],
)
def test_bad_input_is_named(make: object, message: str) -> None:
    with pytest.raises(ValidationFailed, match=message):
        make()  # type: ignore[operator]
