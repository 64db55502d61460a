"""Data and helpers of bench/load.py: a random Llama-shaped bf16 checkpoint of about N GB in
four forms (HF safetensors, pytorch_model.bin, tensorizer, sllm, the last also as an entry of
an SSD tier), cache dropping, the fio limit and the memcpy limit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

DATA = Path(__file__).resolve().parent / ".data"
MiB = 1 << 20
# The key the checkpoint has in the bench's SSD tier (bench/_load_peers.py reads it from there).
SSD_KEY = "checkpoints/bench/load"
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
    """(hf dir with model.safetensors, dir with pytorch_model.bin, sllm dir), built once; the
    root also holds ``tensorizer/model.tensors`` and ``ssd/``, an SSD tier holding the sllm
    checkpoint (hard links to the same files, so one page cache)."""
    root = DATA / f"llama-{size_gb:g}gb"
    hf, pt, ckpt = root / "hf", root / "pt", root / "sllm"
    if (root / "complete").exists():
        _ensure_extras(root, hf, ckpt)
        return hf, pt, ckpt
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime.ckpt.convert import convert_checkpoint

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
    _ensure_extras(root, hf, ckpt)
    return hf, pt, ckpt


def _ensure_extras(root: Path, hf: Path, ckpt: Path) -> None:
    tensors = root / "tensorizer" / "model.tensors"
    if not tensors.exists():
        from safetensors.torch import load_file
        from tensorizer import TensorSerializer

        tensors.parent.mkdir(exist_ok=True)
        tmp = tensors.with_suffix(".tmp")
        serializer = TensorSerializer(str(tmp))
        serializer.write_state_dict(load_file(str(hf / "model.safetensors")))
        serializer.close()
        tmp.rename(tensors)
    entry = root / "ssd" / "entries" / quote(SSD_KEY, safe="")
    if not entry.exists():
        tmp_entry = entry.with_name(entry.name + ".tmp")
        shutil.rmtree(tmp_entry, ignore_errors=True)
        tmp_entry.mkdir(parents=True)
        for f in ckpt.iterdir():
            os.link(f, tmp_entry / f.name)
        tmp_entry.rename(entry)


def tensorizer_file(ckpt: Path) -> Path:
    return ckpt.parent / "tensorizer" / "model.tensors"


def ssd_root(ckpt: Path) -> Path:
    return ckpt.parent / "ssd"


def ensure_fio() -> str:
    """The fio binary; installed with apt-get (Debian's package) when missing, saying so."""
    found = shutil.which("fio")
    if found:
        return found
    print("fio is not installed: installing Debian's fio package (apt-get)", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "fio"], check=True)
    found = shutil.which("fio")
    if not found:
        raise SystemExit("fio: apt-get ran but no fio binary was installed")
    return found


FIO_JOBS = (("16m", 4), ("4m", 16))


def fio_read(fio: str, paths: list[Path]) -> dict[str, float]:
    """Seconds for fio to read every byte of ``paths`` (O_DIRECT, libaio), once per job shape
    of ``FIO_JOBS`` (block size, queue depth): the disk's limit is the fastest of them."""
    out: dict[str, float] = {}
    total = sum(p.stat().st_size for p in paths)
    for bs, depth in FIO_JOBS:
        result = subprocess.run(
            [
                fio, "--name=limit", "--readonly", "--rw=read", "--direct=1",
                "--ioengine=libaio", f"--bs={bs}", f"--iodepth={depth}",
                "--filename=" + ":".join(str(p).replace(":", "\\:") for p in paths),
                "--output-format=json",
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        job = json.loads(result.stdout)["jobs"][0]["read"]
        # fio reads whole blocks: each file's tail under one block is left out, so the time
        # is scaled to every byte at fio's own rate
        if job["io_bytes"] < 0.95 * total:
            raise RuntimeError(f"fio read {job['io_bytes']} of {total} bytes")
        out[f"fio_{bs}_qd{depth}"] = job["runtime"] / 1000.0 * total / job["io_bytes"]
    return out


def files_of(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffixes))


def drop_caches(paths: list[Path]) -> str:
    """Evict the page cache; returns how ("drop_caches" as root, else "fadvise" on the files
    of ``paths``, directories included)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in paths:
            for file in [path] if path.is_file() else path.rglob("*"):
                if file.is_file():
                    fd = os.open(file, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
        return "fadvise"


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


def load_average() -> float:
    return os.getloadavg()[0]
