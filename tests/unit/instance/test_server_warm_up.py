"""A pre-started instance process loads uvicorn's server modules while idle, not between its
model and ``ready`` (0.54-0.64 s there, measured)."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys
from runtime.instance.worker import server_warm_up
server_warm_up()
wanted = ("uvicorn.protocols.http.auto", "uvicorn.lifespan.on", "uvicorn.protocols.websockets.auto")
print(",".join(m for m in wanted if m not in sys.modules))
"""


def test_server_warm_up_loads_the_protocol_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"not loaded while idle: {out.stdout.strip()}"
