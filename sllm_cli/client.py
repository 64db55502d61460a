"""HTTP client of the gateway, as the CLI uses it.

Where the gateway is, which admin token and which invocation key to send is resolved once, in
this order: command-line flags, then the environment (``SLLM_GATEWAY_URL``, ``SLLM_TOKEN``,
``SLLM_KEY``), then the config file ``~/.config/sllm/config.yaml`` (written by ``sllm up``),
then the default URL. Invocations send the key, or the admin token when there is no key.

Every failure becomes a typed ``SllmError`` with one line that says what to do: a gateway that
does not answer names its URL and ``sllm up``; an error body ``{"error": {"code", "message"}}``
keeps the gateway's code and message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from sllm import errors
from sllm.errors import SllmError, Unauthorized, Unavailable, ValidationFailed
from sllm.settings import ENVIRONMENT

DEFAULT_URL = ENVIRONMENT["SLLM_GATEWAY_URL"][0]
_ERRORS_BY_CODE: dict[str, type[SllmError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidInput,
        errors.ValidationFailed,
        errors.NotFound,
        errors.Conflict,
        errors.Unauthorized,
        errors.Forbidden,
        errors.PayloadTooLarge,
        errors.Overloaded,
        errors.Unavailable,
        errors.CheckpointError,
        errors.StoreError,
        errors.CacheFull,
        errors.ProtocolError,
    )
}


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/sllm/config.yaml``, by default ``~/.config/sllm/config.yaml``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return Path(base) / "sllm" / "config.yaml"


CONFIG_KEYS = ("gateway_url", "token", "key")


def read_config_file(path: Path) -> dict[str, str]:
    """The ``gateway_url``, ``token`` and ``key`` of a config file; {} when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ValidationFailed(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationFailed(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationFailed(f"{path}: expected a mapping with gateway_url and token")
    out: dict[str, str] = {}
    for key in CONFIG_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValidationFailed(f"{path}: {key} must be a string")
        out[key] = value
    return out


def write_config_file(path: Path, gateway_url: str, token: str) -> None:
    """Write the config atomically, readable by its owner only (it holds the token). A
    ``key`` the file already has is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = read_config_file(path)
    except ValidationFailed:
        data = {}
    data.update(gateway_url=gateway_url, token=token)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=True)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str = field(repr=False)
    key: str = field(default="", repr=False)

    @staticmethod
    def resolve(
        url: str | None = None,
        token: str | None = None,
        env: Mapping[str, str] | None = None,
        key: str | None = None,
    ) -> ClientConfig:
        """Flags > environment > config file > default (see the module docstring)."""
        env = os.environ if env is None else env
        from_file = read_config_file(config_path(env))
        resolved_url = (
            url or env.get("SLLM_GATEWAY_URL") or from_file.get("gateway_url") or DEFAULT_URL
        )
        if not resolved_url.startswith(("http://", "https://")):
            raise ValidationFailed(
                f"gateway URL {resolved_url!r} must start with http:// or https://"
            )
        resolved_token = token or env.get("SLLM_TOKEN") or from_file.get("token") or ""
        resolved_key = key or env.get("SLLM_KEY") or from_file.get("key") or ""
        return ClientConfig(resolved_url.rstrip("/"), resolved_token, resolved_key)


def error_from_response(response: httpx.Response, url: str, invoking: bool = False) -> SllmError:
    """The typed error of a non-2xx gateway response (its code and message when it sent one).
    ``invoking``: the request was an invocation, where a 401 is about the key."""
    code, message = None, None
    try:
        body = json.loads(response.read() or b"null")
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = body["error"].get("code")
            message = body["error"].get("message")
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    if response.status_code == 401 and invoking:
        return Unauthorized(
            f"{message or 'the gateway refused the call'}; pass --key, set SLLM_KEY or add "
            "'key: <key>' to ~/.config/sllm/config.yaml"
        )
    if response.status_code == 401:
        return Unauthorized(
            f"the gateway at {url} rejected the token: pass --token, set SLLM_TOKEN, or run "
            "`sllm up`, which writes it to ~/.config/sllm/config.yaml"
        )
    if not isinstance(message, str):
        message = f"gateway answered {response.status_code} {response.reason_phrase}"
    cls = _ERRORS_BY_CODE.get(code, SllmError) if isinstance(code, str) else SllmError
    if cls is errors.Overloaded:
        return errors.Overloaded(message)
    return cls(message, code=code if isinstance(code, str) else None, status=response.status_code)


class GatewayClient:
    """Synchronous client of the gateway's admin and invocation API (the shared contract)."""

    def __init__(
        self,
        config: ClientConfig,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self._http = httpx.Client(
            base_url=config.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _not_running(self) -> Unavailable:
        return Unavailable(
            f"no gateway is answering at {self.config.url}: start one with `sllm up` (or point "
            "the CLI elsewhere with --url or SLLM_GATEWAY_URL)"
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; non-2xx answers raise the typed error they carry."""
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise self._not_running() from None
        except httpx.TimeoutException:
            raise Unavailable(f"the gateway at {self.config.url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise Unavailable(
                f"talking to the gateway at {self.config.url} failed: {exc}"
            ) from None
        if response.status_code >= 400:
            raise error_from_response(response, self.config.url)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Unavailable(
                f"the gateway at {self.config.url} answered {method} {path} with non-JSON"
            ) from None

    def healthy(self) -> bool:
        """True when /healthz answers 200 (never raises)."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/system/info")
        return result

    def functions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/system/functions")
        return result

    def function(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/system/functions/{name}")
        return result

    def exists(self, name: str) -> bool:
        try:
            self.function(name)
        except errors.NotFound:
            return False
        return True

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._json("POST", "/system/functions", json=body)
        return result

    def update(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._json("PUT", f"/system/functions/{name}", json=body)
        return result

    def remove(self, name: str) -> None:
        self._json("DELETE", f"/system/functions/{name}")

    def scale(self, name: str, replicas: int) -> None:
        self._json("POST", f"/system/scale/{name}", json={"replicas": replicas})

    def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/system/nodes")
        return result

    def logs(self, name: str, tail: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json(
            "GET", f"/system/logs/{name}", params={"tail": tail}
        )
        return result

    def _invocation_auth(self) -> dict[str, str]:
        """The key, else the admin token (which opens every function)."""
        secret = self.config.key or self.config.token
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    def create_key(self, name: str, functions: list[str]) -> dict[str, Any]:
        body = {"name": name, "functions": functions}
        result: dict[str, Any] = self._json("POST", "/system/keys", json=body)
        return result

    def keys(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/system/keys")
        return result

    def revoke_key(self, key_id: str) -> None:
        self._json("DELETE", f"/system/keys/{key_id}")

    def invoke(self, name: str, body: dict[str, Any], timeout_s: float = 600.0) -> Iterator[Event]:
        """POST /function/<name>: yields the answer as events, streamed when the function streams.

        A JSON answer is one ``Event(json=...)``; an SSE answer yields one event per
        ``data:`` line up to ``[DONE]``; an error event mid-stream raises its typed error.
        """
        try:
            with self._http.stream(
                "POST",
                f"/function/{name}",
                json=body,
                headers=self._invocation_auth(),
                timeout=httpx.Timeout(timeout_s, connect=5.0),
            ) as response:
                if response.status_code >= 400:
                    raise error_from_response(response, self.config.url, invoking=True)
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    yield from _sse_events(response.iter_lines())
                    return
                raw = response.read()
                try:
                    yield Event(json=json.loads(raw) if raw else None)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    yield Event(text=raw.decode("utf-8", errors="replace"))
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise self._not_running() from None
        except httpx.TimeoutException:
            raise Unavailable(f"function {name!r} did not answer within {timeout_s:.0f}s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"the stream from function {name!r} broke: {exc}") from None


@dataclass(frozen=True)
class Event:
    """One piece of an invocation's answer: streamed text, or a whole JSON/text answer."""

    delta: str | None = None
    json: Any = None
    text: str | None = None
    finish_reason: str | None = None


def _sse_events(lines: Iterator[str]) -> Iterator[Event]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            yield Event(text=payload)
            continue
        if not isinstance(data, dict):
            yield Event(json=data)
        elif isinstance(data.get("error"), dict):
            err = data["error"]
            code = err.get("code") if isinstance(err.get("code"), str) else None
            cls = _ERRORS_BY_CODE.get(code or "", SllmError)
            if cls is errors.Overloaded:
                raise errors.Overloaded(str(err.get("message")))
            raise cls(str(err.get("message", "error in stream")), code=code)
        elif "delta" in data:
            yield Event(delta=str(data["delta"]))
        elif "finish_reason" in data:
            yield Event(finish_reason=str(data["finish_reason"]))
        else:
            yield Event(json=data)
