"""The container engine adapter: podman's CLI, with the project's ``containers.conf``.

Only what the node and the image builds need: find the engine, ask about images, build, import
a root file system, remove a node's containers. Every call names the engine's own error on
failure (``ContainerError``). ``podman run`` of instances lives in ``runtime.container.backend``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sllm.errors import SllmError

CONF = Path(__file__).with_name("containers.conf")
# The host's CA bundle, mounted over the image's for builds and instances: where egress
# re-signs TLS (as on the machines this was built on), only the host's bundle verifies PyPI.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"


class ContainerError(SllmError):
    """The container engine refused or failed a command (its message says why)."""

    code = "container_failed"
    status = 502


@dataclass(frozen=True)
class Podman:
    binary: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(CONF)}

    def command(self, *args: str) -> list[str]:
        return [self.binary, *args]

    def run(
        self, *args: str, timeout: float = 120.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman args``; ContainerError with its stderr when it fails."""
        try:
            done = subprocess.run(
                self.command(*args),
                input=input,
                capture_output=True,
                timeout=timeout,
                env=self.env(),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ContainerError(f"podman {args[0]} did not finish in {timeout:.0f}s") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip()[-2000:]
            raise ContainerError(f"podman {' '.join(args[:2])} failed: {tail}")
        return done

    def image_id(self, ref: str) -> str | None:
        """The image's id, or None when no local image has that name."""
        done = subprocess.run(
            self.command("image", "inspect", "--format", "{{.Id}}", ref),
            capture_output=True,
            env=self.env(),
            timeout=60,
            check=False,
        )
        return done.stdout.decode().strip() if done.returncode == 0 else None

    def tag(self, ref: str, *names: str) -> None:
        if names:
            self.run("tag", ref, *names)

    def build(
        self,
        context: Path,
        dockerfile: Path,
        tag: str,
        *,
        build_args: Mapping[str, str] | None = None,
        build_contexts: Mapping[str, Path] | None = None,
        timeout: float = 1800.0,
    ) -> str:
        """``podman build`` against local images only (``--pull=never``: no registry is
        needed; FROM names must exist locally), with the host's network and CA bundle for
        package downloads. Returns the image id."""
        args = ["build", "--pull=never", "--network=host", "--layers", "-f", str(dockerfile)]
        args += ["-t", tag]
        if HOST_CA_BUNDLE.is_file():
            args += ["--volume", f"{HOST_CA_BUNDLE}:{CA_IN_IMAGE}:ro"]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        for name, path in (build_contexts or {}).items():
            args += ["--build-context", f"{name}={path}"]
        self.run(*args, str(context), timeout=timeout)
        image = self.image_id(tag)
        if image is None:
            raise ContainerError(f"podman build reported success but {tag} does not exist")
        return image

    def import_rootfs(self, tarball: Path, tag: str, changes: Sequence[str] = ()) -> str:
        args = ["import"]
        for change in changes:
            args += ["--change", change]
        self.run(*args, str(tarball), tag, timeout=600)
        image = self.image_id(tag)
        if image is None:
            raise ContainerError(f"podman import reported success but {tag} does not exist")
        return image

    def remove_containers(self, label: str) -> None:
        """Remove (killing first) every container carrying ``label`` (key=value)."""
        done = self.run("ps", "-aq", "--filter", f"label={label}")
        ids = done.stdout.decode().split()
        if ids:
            self.run("rm", "-f", "-t", "0", *ids, timeout=120)


def find_podman() -> Podman | None:
    """podman when it is installed and this process is root (the container backend mounts
    checkpoints into running containers and writes their cgroups), else None."""
    binary = shutil.which("podman")
    if binary is None or os.geteuid() != 0:
        return None
    return Podman(binary)


def engine_problem() -> str | None:
    """Why the container backend cannot run here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    if os.geteuid() != 0:
        return "the container backend needs root (it mounts checkpoints into containers)"
    return None
