"""Typed errors shared by every component.

Each error carries a stable ``code`` (a snake_case string clients can match on) and an HTTP
status; the gateway maps them to JSON bodies in one place and the CLI prints them as one line.
"""

from __future__ import annotations


class SllmError(Exception):
    """Base of every error the platform raises on purpose."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class InvalidInput(SllmError):
    """The caller sent something malformed; the message names the field and what to fix."""

    code = "invalid_input"
    status = 400


class ValidationFailed(SllmError):
    """A function spec or settings value failed validation (names the key)."""

    code = "validation_failed"
    status = 422


class NotFound(SllmError):
    """The named thing (function, instance, key, node) does not exist."""

    code = "not_found"
    status = 404


class Conflict(SllmError):
    """The request clashes with the current state (exists already, busy, not ready)."""

    code = "conflict"
    status = 409


class StaleRevision(Conflict):
    """A revision-checked KV write lost: the key changed (or came into being) since the revision
    the writer read. The writer reads again and decides again."""

    code = "stale_revision"


class Unauthorized(SllmError):
    """No credentials, or credentials nobody issued."""

    code = "unauthorized"
    status = 401


class Forbidden(SllmError):
    """The caller is known but may not do this (an invocation key without that function)."""

    code = "forbidden"
    status = 403


class PayloadTooLarge(SllmError):
    """A request body over the configured limit."""

    code = "payload_too_large"
    status = 413


class Overloaded(SllmError):
    """A bounded queue is full; retry after ``retry_after_s`` seconds."""

    code = "overloaded"
    status = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(SllmError):
    """No instance could be made ready in time, or a dependency is down."""

    code = "unavailable"
    status = 503


class CheckpointError(SllmError):
    """A checkpoint on disk or in a store is missing, corrupt or malformed (names the file)."""

    code = "checkpoint_invalid"
    status = 422


class StoreError(SllmError):
    """The model store failed (unreachable, 5xx after retries, missing bucket or object)."""

    code = "store_error"
    status = 502


class CacheFull(SllmError):
    """A cache tier cannot hold the checkpoint even after evicting everything evictable."""

    code = "cache_full"
    status = 507


class UnsupportedModel(SllmError):
    """A model the serving engine cannot run (names what it lacks support for)."""

    code = "unsupported_model"
    status = 422


class ProtocolError(SllmError):
    """A wire message was malformed, of an unknown type or of an unsupported version."""

    code = "protocol_error"
    status = 400
