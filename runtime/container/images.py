"""Images, all built locally: the base (Debian from ``debootstrap``), the runtime and gateway
images from ``docker/``, and function images (the runtime image plus a function's
requirements). Every name is content-addressed, so a build happens once per content.

No registry is needed: the base image is imported from a root file system, and is also tagged
with the registry names the Dockerfiles' FROM lines use (local stand-ins, built with
``--pull=never``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import xxhash

from runtime.container.podman import ContainerError, Podman

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # a source checkout: docker/ lies here
BASE_IMAGE = "localhost/sllm-base:bookworm"
# The FROM names of docker/*.Dockerfile, tagged onto the local base: stand-ins, not the
# registry's images (no registry is reachable where this runs).
STANDINS = ("docker.io/library/python:3.11-slim",)
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3-minimal,python3-venv,python3-pip,passwd"
FUNCTION_DOCKERFILE = Path(__file__).with_name("function.Dockerfile")
RUNTIME_INPUTS = (
    "docker/runtime.Dockerfile",
    "pyproject.toml",
    "README.md",
    "sllm",
    "gateway",
    "runtime",
)
GATEWAY_INPUTS = (
    "docker/gateway.Dockerfile", "pyproject.toml", "README.md", "requirements.lock", "sllm",
    "gateway", "runtime", "templates", "functions",
)  # fmt: skip


def digest_files(root: Path, inputs: Iterable[str], extra: str = "") -> str:
    """xxh3 over the relative paths and bytes of ``inputs`` (files or directories under
    ``root``; caches and bytecode left out) and ``extra``: 16 hex digits."""
    h = xxhash.xxh3_64()
    h.update(extra.encode())
    for name in inputs:
        path = root / name
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if not f.is_file() or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(f"{f.relative_to(root).as_posix()}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def ensure_base(podman: Podman, cache_dir: Path, mirror: str = DEBIAN_MIRROR) -> str:
    """The local base image (Debian bookworm minbase with Python 3.11), made once: the root
    file system from ``debootstrap`` (~45 s) is kept as a tarball in ``cache_dir``, so an
    emptied image store re-imports it in seconds."""
    if podman.image_id(BASE_IMAGE) is None:
        tarball = cache_dir / "sllm-base-bookworm.tar"
        if not tarball.is_file():
            _debootstrap(tarball, mirror)
        podman.import_rootfs(
            tarball,
            BASE_IMAGE,
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                'CMD ["/bin/bash"]',
            ],
        )
        log.info("base image %s imported from %s", BASE_IMAGE, tarball)
    podman.tag(BASE_IMAGE, *STANDINS)
    return BASE_IMAGE


def _debootstrap(tarball: Path, mirror: str) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ContainerError("debootstrap is not installed: it makes the base image")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sllm-rootfs-", dir=tarball.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
             str(rootfs), mirror],
            capture_output=True, timeout=1200, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).decode(errors="replace").strip()[-2000:]
            raise ContainerError(f"debootstrap of the base image failed: {tail}")
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        partial = tarball.with_suffix(".tmp")
        subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."],
            check=True, timeout=600,
        )  # fmt: skip
        os.replace(partial, tarball)


def find_links() -> Path | None:
    """The directory pip takes extra wheels from (PIP_FIND_LINKS, else pip's configuration):
    where this kind of machine keeps torch 2.13.0+cpu, which PyPI does not have."""
    raw = os.environ.get("PIP_FIND_LINKS", "")
    if not raw:
        done = subprocess.run(
            ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        found = re.search(r"find-links='([^']*)'", done.stdout)
        raw = found.group(1) if found else ""
    for item in raw.split():
        path = Path(item.removeprefix("file://"))
        if path.is_dir():
            return path
    return None


def _build_once(
    podman: Podman,
    name: str,
    digest: str,
    dockerfile: Path,
    context: Path,
    build_args: Mapping[str, str],
    build_contexts: Mapping[str, Path],
) -> str:
    tag = f"{name}:{digest}"
    if podman.image_id(tag) is None:
        log.info("building %s", tag)
        podman.build(context, dockerfile, tag, build_args=build_args, build_contexts=build_contexts)
    return tag


def ensure_runtime_image(podman: Podman, cache_dir: Path, repo: Path = REPO) -> str:
    """The CPU runtime image of this checkout (``docker/runtime.Dockerfile`` on the local
    base, requirements.lock, torch from pip's find-links), tagged by the digest of its inputs."""
    wheels = find_links()
    if wheels is None:
        raise ContainerError(
            "no find-links directory with torch 2.13.0+cpu (PIP_FIND_LINKS or pip's "
            "configuration): the CPU runtime image cannot install torch"
        )
    base = ensure_base(podman, cache_dir)
    args = {"LOCK": "requirements.lock"}
    digest = digest_files(
        repo,
        (*RUNTIME_INPUTS, "requirements.lock"),
        f"{podman.image_id(base)}{sorted(args.items())}",
    )
    return _build_once(
        podman, "localhost/sllm-runtime", digest, repo / "docker/runtime.Dockerfile", repo,
        args, {"wheels": wheels},
    )  # fmt: skip


def ensure_gateway_image(podman: Podman, cache_dir: Path, repo: Path = REPO) -> str:
    """The gateway image of this checkout (``docker/gateway.Dockerfile`` on the local base)."""
    base = ensure_base(podman, cache_dir)
    digest = digest_files(repo, GATEWAY_INPUTS, podman.image_id(base) or "")
    return _build_once(
        podman, "localhost/sllm-gateway", digest, repo / "docker/gateway.Dockerfile", repo, {}, {}
    )


def requirement_lines(text: str) -> list[str]:
    """The requirement lines of a requirements.txt (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def function_image_name(podman: Podman, runtime_image: str, requirements: str) -> str:
    """The name of a function's image: ``runtime_image`` itself when the function needs no
    packages, else a tag of the digest of (runtime image id, requirement lines, recipe)."""
    lines = requirement_lines(requirements)
    if not lines:
        return runtime_image
    runtime_id = podman.image_id(runtime_image)
    if runtime_id is None:
        raise ContainerError(f"runtime image {runtime_image} does not exist on this node")
    h = xxhash.xxh3_64(runtime_id.encode())
    h.update("\n".join(lines).encode())
    h.update(FUNCTION_DOCKERFILE.read_bytes())
    return f"localhost/sllm-fn:{h.hexdigest()}"


def ensure_function_image(podman: Podman, runtime_image: str, requirements: str) -> str:
    """The image a function's instances run (``function_image_name``), built now from
    ``runtime/container/function.Dockerfile`` FROM the runtime image when it does not exist."""
    tag = function_image_name(podman, runtime_image, requirements)
    if tag == runtime_image or podman.image_id(tag) is not None:
        return tag
    lines = requirement_lines(requirements)
    runtime_id = podman.image_id(runtime_image) or runtime_image
    with tempfile.TemporaryDirectory(prefix="sllm-fn-build-") as tmp:
        context = Path(tmp)
        (context / "requirements.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        shutil.copy(FUNCTION_DOCKERFILE, context / "Dockerfile")
        log.info("building function image %s (%s)", tag, ", ".join(lines))
        podman.build(context, context / "Dockerfile", tag, build_args={"RUNTIME_IMAGE": runtime_id})
    return tag
