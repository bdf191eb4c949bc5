"""TLS and mutual TLS over REST and gRPC, with certificates made by ``openssl`` and tritonclient's TLS options."""

from __future__ import annotations

import gc
import json
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import EchoModel, LiveServer, wait_for
from tlsutil import Certs, make_certs

from modelpod.errors import UsageError
from modelpod.protocols.tls import TlsFiles
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

grpc = pytest.importorskip("grpc")
triton_http = pytest.importorskip("tritonclient.http")
triton_grpc = pytest.importorskip("tritonclient.grpc")
triton_utils = pytest.importorskip("tritonclient.utils")

# geventhttpclient (under tritonclient.http) checks the host name with ssl.match_hostname, and its
# ssl_options path makes an SSLContext with ssl.PROTOCOL_TLS: both deprecated in the standard library.
pytestmark = [pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")]
X = np.arange(6, dtype=np.float32).reshape(3, 2)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def setup(engine: InferenceEngine) -> None:
    engine.add_model(EchoModel(), name="echo", version=1)


def tls_settings(certs: Certs, mutual: bool) -> Settings:
    return Settings(tls_cert=certs.server_cert, tls_key=certs.server_key,
                    tls_client_ca=certs.ca if mutual else None, header_timeout_s=2.0)


@pytest.fixture(scope="module")
def server(certs: Certs) -> Iterator[LiveServer]:
    with LiveServer(tls_settings(certs, mutual=False), setup, grpc=True) as live:
        yield live


@pytest.fixture(scope="module")
def mtls(certs: Certs) -> Iterator[LiveServer]:
    with LiveServer(tls_settings(certs, mutual=True), setup, grpc=True) as live:
        yield live


def hostport(live: LiveServer) -> str:
    return live.url.removeprefix("https://")


def with_http(url: str, use: Callable[[Any], None], **options: Any) -> None:
    """``use(client)`` with a tritonclient HTTP client, closed and collected here, in this thread: its
    gevent hub belongs to it, and a collection in the server's thread would fail in ``__del__``."""
    def run() -> None:
        client = triton_http.InferenceServerClient(url, **options)
        try:
            use(client)
        finally:
            client.close()

    run()
    gc.collect()


def http_infer(client: Any) -> np.ndarray[Any, Any]:
    x = triton_http.InferInput("x", [3, 2], "FP32")
    x.set_data_from_numpy(X)
    result = client.infer("echo", [x])
    return np.asarray(result.as_numpy("y"))


def grpc_infer(client: Any) -> np.ndarray[Any, Any]:
    x = triton_grpc.InferInput("x", [3, 2], "FP32")
    x.set_data_from_numpy(X)
    result = client.infer("echo", [x], client_timeout=30)
    return np.asarray(result.as_numpy("y"))


def test_https_with_tritonclient_ssl_options(server: LiveServer, certs: Certs) -> None:
    assert server.url.startswith("https://")
    def use(client: Any) -> None:
        assert client.is_server_live()
        np.testing.assert_array_equal(http_infer(client), X)

    with_http(hostport(server), use, ssl=True, ssl_options={"ca_certs": str(certs.ca)})


def test_https_with_tritonclient_ssl_context(server: LiveServer, certs: Certs) -> None:
    import gevent.ssl

    def context() -> Any:
        return gevent.ssl.create_default_context(cafile=str(certs.ca))

    def use(client: Any) -> None:
        assert client.is_server_ready()
        np.testing.assert_array_equal(http_infer(client), X)

    with_http(hostport(server), use, ssl=True, ssl_context_factory=context)


def test_grpc_tls_with_tritonclient(server: LiveServer, certs: Certs) -> None:
    client = triton_grpc.InferenceServerClient(f"localhost:{server.grpc_port}", ssl=True,
                                               root_certificates=str(certs.ca))
    try:
        assert client.is_server_live()
        np.testing.assert_array_equal(grpc_infer(client), X)
    finally:
        client.close()


def test_an_untrusting_client_refuses_the_server(server: LiveServer) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), httpx.Client(timeout=30) as c:
        c.get(f"{server.url}/v2/health/live")  # the system CAs do not know the test CA


def test_mutual_tls_with_client_certificates(mtls: LiveServer, certs: Certs) -> None:
    import gevent.ssl

    def context() -> Any:
        ctx = gevent.ssl.create_default_context(cafile=str(certs.ca))
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        return ctx

    with_http(hostport(mtls), lambda client: np.testing.assert_array_equal(http_infer(client), X), ssl=True,
              ssl_context_factory=context)
    gclient = triton_grpc.InferenceServerClient(f"localhost:{mtls.grpc_port}", ssl=True,
                                                root_certificates=str(certs.ca), private_key=str(certs.client_key),
                                                certificate_chain=str(certs.client_cert))
    try:
        np.testing.assert_array_equal(grpc_infer(gclient), X)
    finally:
        gclient.close()


def raw_tls_get(live: LiveServer, ctx: ssl.SSLContext, path: str = "/v2/health/live") -> bytes:
    """GET ``path`` over a raw TLS socket; what comes back until the server closes."""
    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data


def test_mutual_tls_without_a_certificate_reaches_only_health(mtls: LiveServer, certs: Certs) -> None:
    assert raw_tls_get(mtls, certs.client_context(), "/v2/models/echo").startswith(b"HTTP/1.1 200 OK")
    bare = certs.client_context(cert=False)
    assert raw_tls_get(mtls, bare).startswith(b"HTTP/1.1 200 OK")  # probes need no certificate
    assert raw_tls_get(mtls, bare, "/v2/health/ready").startswith(b"HTTP/1.1 200 OK")
    head, _, body = raw_tls_get(mtls, bare, "/v2/models/echo").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ") and b"connection: close" in head
    assert "requires a client certificate" in json.loads(body)["error"]
    def use(client: Any) -> None:
        assert client.is_server_live()
        with pytest.raises(triton_utils.InferenceServerException, match="requires a client certificate"):
            http_infer(client)

    with_http(hostport(mtls), use, ssl=True, ssl_options={"ca_certs": str(certs.ca)})
    # gRPC requires the certificate in the handshake: a clear UNAVAILABLE.
    with grpc.secure_channel(f"localhost:{mtls.grpc_port}", grpc.ssl_channel_credentials(
            root_certificates=certs.ca.read_bytes())) as channel:
        with pytest.raises(grpc.RpcError) as rpc:
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=30)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mutual_tls_refuses_a_certificate_of_another_ca(mtls: LiveServer, certs: Certs,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="modelpod.serving")
    try:
        answer = raw_tls_get(mtls, certs.client_context(rogue=True))
    except OSError:  # ssl.SSLError or a reset: the handshake failed
        answer = b""
    assert answer == b""  # no answer at all
    wait_for(lambda: any("TLS handshakes failed" in r.getMessage() for r in caplog.records), 30, "the log line")
    record = next(r for r in caplog.records if "TLS handshakes failed" in r.getMessage())
    assert "CERTIFICATE_VERIFY_FAILED" in str(record.__dict__["fields"]["last_reason"]).upper()
    with grpc.secure_channel(f"localhost:{mtls.grpc_port}", grpc.ssl_channel_credentials(
            root_certificates=certs.ca.read_bytes(), private_key=certs.rogue_key.read_bytes(),
            certificate_chain=certs.rogue_cert.read_bytes())) as channel:
        with pytest.raises(grpc.RpcError) as rpc:
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=30)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert raw_tls_get(mtls, certs.client_context()).startswith(b"HTTP/1.1 200 OK")


def test_plain_http_to_the_tls_port_gets_a_clear_400_and_the_server_goes_on(server: LiveServer, certs: Certs) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # the server closes (no hang: the socket timeout would raise)
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head
    assert json.loads(body) == {"error": "this port speaks HTTPS (TLS): use https://"}
    # A plain gRPC client to the TLS gRPC port: a clear UNAVAILABLE, not a hang.
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as rpc:
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=30)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert raw_tls_get(server, certs.client_context(cert=False)).startswith(b"HTTP/1.1 200 OK")


def test_a_connection_that_never_handshakes_is_closed(server: LiveServer, certs: Certs) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        assert s.recv(1) == b""  # closed after the 2 s handshake deadline; a hang would time out at 30 s
    assert raw_tls_get(server, certs.client_context(cert=False)).startswith(b"HTTP/1.1 200 OK")


def test_bad_tls_files_are_usage_errors(certs: Certs, tmp_path: Path) -> None:
    good = tls_settings(certs, mutual=True)
    (tmp_path / "not.pem").write_text("hello\n")
    cases = [
        (replace(good, tls_key=None), "go together"),
        (replace(good, tls_cert=None, tls_key=None), "needs --tls-cert"),
        (replace(good, tls_key=tmp_path / "missing.key"), "missing.key: cannot read it"),
        (replace(good, tls_key=certs.client_key), "key values mismatch"),
        (replace(good, tls_cert=tmp_path / "not.pem"), "not a PEM file"),
        (replace(good, tls_client_ca=certs.server_key), "tls-client-ca"),
        (replace(good, tls_cert=certs.expired_cert), "expired on"),
    ]
    for settings, fragment in cases:
        with pytest.raises(UsageError, match=fragment):
            TlsFiles.from_settings(settings)
    files = TlsFiles.from_settings(good)
    assert files is not None and files.mutual
    assert TlsFiles.from_settings(Settings()) is None


def test_tls_settings_come_from_the_environment(certs: Certs) -> None:
    settings = Settings.from_env({"MODELPOD_TLS_CERT": str(certs.server_cert),
                                  "MODELPOD_TLS_KEY": str(certs.server_key), "MODELPOD_TLS_CLIENT_CA": str(certs.ca)})
    assert settings.tls_cert == certs.server_cert and settings.tls_client_ca == certs.ca
    assert TlsFiles.from_settings(settings) is not None
