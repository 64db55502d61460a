"""Small HTTP servers on loopback for tests whose server must misbehave on demand (a proxy
that injects faults, an object server that ignores Range...): a ``LoopbackServer`` serving a
``QuietHandler`` subclass on a free port, one thread per connection, keep-alive on."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive), no request log on stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *_: Any) -> None:
        return None

    def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Send ``status`` with ``headers`` and ``body``, its Content-Length set."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[QuietHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
