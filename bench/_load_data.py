"""Data and helpers of bench/load.py: a random Llama-shaped bf16 checkpoint of about N GB in
three forms (HF safetensors, pytorch_model.bin, sllm), cache dropping and raw reads."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parent / ".data"
MiB = 1 << 20
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5632, 16, 32000


def llama_config(size_gb: float) -> dict[str, object]:
    """A Llama config whose bf16 weights take about ``size_gb`` GB (layers of ~103 MB)."""
    layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    layers = max(1, round((size_gb * 1e9 - fixed) / layer))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def ensure_checkpoint(size_gb: float) -> tuple[Path, Path, Path]:
    """(hf dir with model.safetensors, dir with pytorch_model.bin, sllm dir), built once."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime.ckpt.convert import convert_checkpoint

    root = DATA / f"llama-{size_gb:g}gb"
    hf, pt, ckpt = root / "hf", root / "pt", root / "sllm"
    if (root / "complete").exists():
        return hf, pt, ckpt
    shutil.rmtree(root, ignore_errors=True)
    hf.mkdir(parents=True)
    pt.mkdir()
    config = llama_config(size_gb)
    (hf / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(hf / "config.json", pt / "config.json")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.float32)
        t.normal_(0.0, 0.02, generator=g)
        state[name] = t.to(torch.bfloat16)
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    torch.save(state, pt / "pytorch_model.bin")
    del state
    convert_checkpoint(hf, ckpt)
    (root / "complete").write_text("ok\n")
    return hf, pt, ckpt


def files_of(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffixes))


def drop_caches(paths: list[Path]) -> str:
    """Evict the page cache; returns how ("drop_caches" as root, else "fadvise")."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "fadvise"


def raw_read(paths: list[Path], *, threads: int = 4, chunk: int = 16 * MiB) -> float:
    """Seconds to read every byte of ``paths`` with the loader's I/O pattern (O_DIRECT where
    possible, 16 MiB reads, ``threads`` in flight) into one small reused buffer per thread:
    the disk's limit, free of any destination-memory cost."""
    import mmap
    import threading

    from runtime.loader.direct_io import open_direct

    jobs = iter(
        [
            (p, off, min(chunk, p.stat().st_size - off))
            for p in paths
            for off in range(0, p.stat().st_size, chunk)
        ]
    )
    lock = threading.Lock()
    fds = {p: open_direct(str(p)) or os.open(p, os.O_RDONLY) for p in paths}
    buffers = [
        mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in range(threads)
    ]
    for b in buffers:
        b.write(b"\0" * chunk)  # touched once, outside the timing

    def worker(buffer: mmap.mmap) -> None:
        view = memoryview(buffer)
        while True:
            with lock:
                job = next(jobs, None)
            if job is None:
                return
            path, off, length = job
            os.preadv(fds[path], [view[: (length + 4095) // 4096 * 4096]], off)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, buffers))
    seconds = time.perf_counter() - began
    for fd in fds.values():
        os.close(fd)
    return seconds


def memcpy_gbps(nbytes: int = 512 * MiB) -> float:
    """Bandwidth of a large copy between two touched buffers (best of 3)."""
    import torch

    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.zeros(nbytes, dtype=torch.uint8)
    best = 0.0
    for _ in range(3):
        began = time.perf_counter()
        b.copy_(a)
        best = max(best, nbytes / (time.perf_counter() - began) / 1e9)
    return best


def touch_pages(tensors: list[object]) -> int:
    """Read one byte of every page of every tensor (forces lazily mapped bytes in)."""
    import torch

    total = 0
    for t in tensors:
        assert isinstance(t, torch.Tensor)
        flat = t.detach().reshape(-1).view(torch.uint8) if t.numel() else t
        if flat.numel():
            total += int(flat[::4096].sum())
    return total
