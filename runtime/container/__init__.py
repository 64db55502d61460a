"""Function instances in OCI containers (podman): images, mounts and the container backend."""
