"""Container tests: a real podman (with runc), images built on a local Debian base. The
engine fixtures (``podman``, ``runtime_image``) live in tests/conftest.py, shared with e2e."""
