"""Converted checkpoints of the tiny Llama and of the demo model, shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.ckpt.convert import convert_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("tiny-ckpt") / "ckpt"
    convert_checkpoint(tiny_model_dir, dst)
    return dst


@pytest.fixture(scope="session")
def smollm2_ckpt() -> Path:
    """SmolLM2-135M-Instruct from the packaged GGUF, dequantized to bfloat16. Converting takes
    ~30 s on this machine, so the result is cached across sessions (verified on reuse)."""
    import tempfile

    from sllm.errors import NotFound
    from tests.smollm2 import ensure_smollm2_checkpoint

    try:
        return ensure_smollm2_checkpoint(Path(tempfile.gettempdir()) / "sllm-test-cache")
    except NotFound as exc:
        pytest.skip(str(exc))
