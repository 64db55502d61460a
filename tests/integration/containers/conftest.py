"""Container tests: a real podman (with runc), images built on a local Debian base.

The engine is installed from Debian's packages when it is missing and this is root with apt
(a fresh CI machine; ~15 s); elsewhere every test here is skipped, saying why. The base image's
root file system (``debootstrap``, ~45 s to minutes) is kept in the XDG cache directory, and
images are tagged by the digest of their inputs, so a second run builds only what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.container.podman import Podman

pytestmark = pytest.mark.containers
TOOLS = ("podman", "runc", "debootstrap")


def install_engine() -> str | None:
    """Install podman, runc and debootstrap when missing; why not, or None when present."""
    if os.geteuid() != 0:
        return "the container backend and these tests need root (mounts, cgroups)"
    if all(shutil.which(tool) for tool in TOOLS):
        return None
    if shutil.which("apt-get") is None:
        return f"{', '.join(TOOLS)} are not installed and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", *TOOLS],
    ):
        done = subprocess.run(command, capture_output=True, env=env, timeout=900, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).decode(errors="replace").strip()[-500:]
            return f"could not install {', '.join(TOOLS)}: {' '.join(command)}: {tail}"
    return None


@pytest.fixture(scope="session")
def podman() -> Podman:
    problem = install_engine()
    if problem is not None:
        pytest.skip(problem)
    from runtime.container.podman import find_podman

    engine = find_podman()
    assert engine is not None
    return engine


@pytest.fixture(scope="session")
def image_cache() -> Path:
    from runtime.node.main import image_cache_dir

    return image_cache_dir()


@pytest.fixture(scope="session")
def runtime_image(podman: Podman, image_cache: Path) -> str:
    """This checkout's CPU runtime image (docker/runtime.Dockerfile on the local base)."""
    from runtime.container.images import ensure_runtime_image

    return ensure_runtime_image(podman, image_cache)
