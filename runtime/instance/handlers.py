"""Function handlers: the builtin ``chat`` / ``completion`` and custom ``module:function`` ones.

A custom handler's files (``FunctionRecord.handler_source``) are written into a per-instance
directory put on ``sys.path``. Its module may define ``load(model, tokenizer, env)``, called
once before the instance reports ready (its return value is ``ctx.state``); the named function
is called as ``function(request_json, ctx)`` per request. It may be a plain function (run on a
worker thread; use ``ctx.generate`` / ``ctx.stream``) or ``async def`` (use ``ctx.agenerate`` /
``ctx.astream``). It returns a JSON-able value, or an iterator / async iterator whose items are
sent as server-sent events (a string item becomes ``{"delta": item}``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime.backend.base import Backend
from runtime.engine.consumers import aiter_events, generate, generate_blocking, iter_events
from runtime.engine.prompts import Tokenizing, build_request
from runtime.engine.request import ErrorEvent, TokenEvent
from runtime.engine.sampling import SamplingDefaults
from sllm.errors import SllmError, ValidationFailed

BUILTIN = ("chat", "completion", "embedding")


class HandlerLoadError(SllmError):
    """A custom handler failed to import or its ``load`` hook raised."""

    code = "handler_load_failed"
    status = 500


@dataclass
class HandlerContext:
    """What a custom handler gets per request: the model, the tokenizer, the function's env,
    its ``load`` result, and generation helpers that go through the batching engine.

    ``for_request`` gives the copy one call of the handler uses: it remembers the generations
    started through it, so ``cancel`` (the client went away) stops them, and refuses new ones."""

    engine: Backend
    tok: Tokenizing
    defaults: SamplingDefaults
    env: dict[str, str]
    state: Any = None
    model: Any = None
    tokenizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    _started: list[str] | None = field(default=None, repr=False)
    _cancelled: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def for_request(self) -> HandlerContext:
        return replace(self, _started=[], _cancelled=False, _lock=threading.Lock())

    def cancel(self) -> None:
        """Stop the generations started through this copy; any later one fails with 499.
        Thread-safe (called on the event loop while the handler runs on a worker thread)."""
        with self._lock:
            self._cancelled = True
            started = list(self._started or ())
        for request_id in started:
            self.engine.cancel(request_id)

    def _request(self, body: dict[str, Any]) -> Any:
        state = build_request(body, self.tok, self.defaults, chat=True)
        with self._lock:
            if self._cancelled:
                raise SllmError("the client went away", code="client_gone", status=499)
            if self._started is not None:
                self._started.append(state.request_id)
        return state

    def generate(self, **body: Any) -> dict[str, Any]:
        """Blocking generate (call from a plain handler): same fields as /v1/generate."""
        return generate_blocking(self.engine, self._request(body))

    def stream(self, **body: Any) -> Iterator[str]:
        """Blocking stream of text deltas."""
        for event in iter_events(self.engine, self._request(body)):
            if isinstance(event, TokenEvent) and event.delta:
                yield event.delta
            elif isinstance(event, ErrorEvent):
                raise SllmError(event.message, code=event.code)

    async def agenerate(self, **body: Any) -> dict[str, Any]:
        return await generate(self.engine, self._request(body))

    async def astream(self, **body: Any) -> AsyncIterator[str]:
        async for event in aiter_events(self.engine, self._request(body)):
            if isinstance(event, TokenEvent) and event.delta:
                yield event.delta
            elif isinstance(event, ErrorEvent):
                raise SllmError(event.message, code=event.code)


@dataclass
class CustomHandler:
    function: Any
    is_async: bool


def write_handler_source(directory: Path, files: dict[str, str]) -> None:
    """Write the function folder's files (relative paths, no '..') under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    root = directory.resolve()
    for name, text in files.items():
        target = (directory / name).resolve()
        if root not in target.parents or Path(name).is_absolute():
            raise ValidationFailed(f"handler_source: {name!r} is not a relative path in the folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def load_custom_handler(
    handler: str, directory: Path, model: Any, tokenizer: Any, env: dict[str, str]
) -> tuple[CustomHandler, Any]:
    """Import ``module:function`` from ``directory`` and run its ``load`` hook.

    Returns the handler and the hook's result; any failure is a ``HandlerLoadError`` carrying
    the original error's type and message (the node reports it as a failed load)."""
    module_name, _, func_name = handler.partition(":")
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # SyntaxError, ImportError, SystemExit from user code
        raise HandlerLoadError(
            f"handler module {module_name!r} failed to import: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, func_name, None)
    if not callable(function):
        raise HandlerLoadError(f"handler {handler!r}: module has no function {func_name!r}")
    state = None
    hook = getattr(module, "load", None)
    if callable(hook):
        try:
            state = hook(model, tokenizer, env)
        except BaseException as exc:
            raise HandlerLoadError(
                f"handler {module_name}.load failed: {type(exc).__name__}: {exc}"
            ) from None
    return CustomHandler(function, inspect.iscoroutinefunction(function)), state
