"""runtime.store.ranged against a small HTTP server on loopback that misbehaves on demand: a
keep-alive connection it closes while idle, a Range it ignores, a body cut short, an encoded
body. (The S3 path, with a real server, is in test_s3_tiers.py.)"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.store.ranged import RangeAnswerError, RangedGetter, RangeTransferError
from tests.loopback_http import LoopbackServer, QuietHandler

pytestmark = pytest.mark.integration
DATA = bytes(range(256)) * 64  # 16 KiB


class Server(LoopbackServer):
    def __init__(self) -> None:
        super().__init__(_Handler)
        self.mode = "ok"
        self.connections = 0
        self.requests = 0
        self.seen: list[tuple[str, str | None]] = []  # (request target, Proxy-Authorization)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/obj?X-Amz-Signature=x"


class _Handler(QuietHandler):
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:
        self.server.requests += 1
        self.server.seen.append((self.path, self.headers.get("Proxy-Authorization")))
        mode = self.server.mode
        first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        last = min(last + (mode == "more") * 10, len(DATA) - 1)
        body = DATA if mode == "no-range" else DATA[first : last + 1]
        self.send_response(200 if mode == "no-range" else 206)
        if mode != "no-range":
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
        if mode == "gzip":
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)
        if mode in ("cut", "idle-close"):
            self.close_connection = True  # no "Connection: close": the client cannot know


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.start()
    yield srv
    srv.stop()


def read(getter: RangedGetter, url: str, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    got = getter.read_into(url, offset, memoryview(buf))
    return bytes(buf[:got])


def test_keeps_the_connection_and_reads_the_range(server: Server) -> None:
    getter = RangedGetter()
    assert read(getter, server.url, 100, 1000) == DATA[100:1100]
    assert read(getter, server.url, 16_000, 1000) == DATA[16_000:]  # the object ends first
    assert (server.requests, server.connections) == (2, 1)
    getter.close()


def test_a_connection_closed_while_idle_is_replaced(server: Server) -> None:
    getter = RangedGetter()
    server.mode = "idle-close"
    assert read(getter, server.url, 0, 10) == DATA[:10]
    server.mode = "ok"
    # the pooled connection is dead: sent once more, on a new one
    assert read(getter, server.url, 10, 10) == DATA[10:20]
    assert server.connections == 2
    getter.close()


def test_an_ignored_range_is_an_error(server: Server) -> None:
    server.mode = "no-range"
    with pytest.raises(RangeAnswerError, match="HTTP 200") as err:
        read(RangedGetter(), server.url, 100, 10)
    assert err.value.status == 200


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("cut", r"connection closed after 500 of 1000 bytes"),
        ("gzip", r"answer is encoded \(gzip\)"),
        ("more", r"from byte 0 has Content-Range 'bytes 0-1009/16384'"),
    ],
)
def test_broken_answers(server: Server, mode: str, message: str) -> None:
    server.mode = mode
    with pytest.raises(RangeTransferError, match=message):
        read(RangedGetter(), server.url, 0, 1000)


def test_through_the_environments_proxy(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server plays the proxy (it answers absolute-form requests itself): the GET goes
    to it, with the proxy URL's credentials; NO_PROXY sends it direct again."""
    port = server.port
    monkeypatch.setenv("HTTP_PROXY", f"http://us%40er:p%3Ass@127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    getter = RangedGetter()
    assert read(getter, "http://objects.invalid:9000/obj?sig=1", 5, 5) == DATA[5:10]
    # base64 of "us@er:p:ss"
    assert server.seen[-1] == ("http://objects.invalid:9000/obj?sig=1", "Basic dXNAZXI6cDpzcw==")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert read(getter, server.url, 0, 5) == DATA[:5]
    assert server.seen[-1] == ("/obj?X-Amz-Signature=x", None)
    getter.close()


def test_nobody_listening(server: Server) -> None:
    port = server.port
    server.stop()
    with pytest.raises(RangeTransferError, match=rf"cannot connect to 127\.0\.0\.1:{port}:"):
        read(RangedGetter(), f"http://127.0.0.1:{port}/obj", 0, 10)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, signed by its own key: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sllm-test-s3")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_checks_the_certificate(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS against the system's trust store, or AWS_CA_BUNDLE, as boto3 does."""
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.port}/obj?X-Amz-Signature=x"
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    with pytest.raises(RangeTransferError, match="CERTIFICATE_VERIFY_FAILED"):
        read(RangedGetter(), url, 0, 10)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    getter = RangedGetter()
    assert read(getter, url, 100, 10) == DATA[100:110]
    assert read(getter, url, 200, 10) == DATA[200:210]
    assert server.connections == 1  # kept alive (the refused handshake never got a handler)
    getter.close()
