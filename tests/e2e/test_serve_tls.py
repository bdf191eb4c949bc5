"""A real ``modelpod serve`` over mutual TLS with scoped tokens: flags and ``MODELPOD_TLS_*``, tritonclient's
TLS options for HTTP and gRPC, and no token in a debug log."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from servutil import PYTHON, REPO, ServeProcess, modelpod_serve
from tlsutil import Certs, make_certs

from modelpod.store import PodRecord

# geventhttpclient (under tritonclient.http) checks the host name with ssl.match_hostname, deprecated.
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")]
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

APP, OPS = "app-token-61c0f2", "ops-token-d94e1a"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    path.write_text(f"""tokens:
  - name: app
    sha256: {hashlib.sha256(APP.encode()).hexdigest()}
    scopes: [infer]
    models: [lr]
  - name: ops
    token: {OPS}
    scopes: [infer, read, manage]
""")
    path.chmod(0o600)
    return path


def http_client(server: ServeProcess, certs: Certs) -> Any:
    import gevent.ssl

    def context() -> Any:
        ctx = gevent.ssl.create_default_context(cafile=str(certs.ca))
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        return ctx

    return httpclient.InferenceServerClient(server.url.removeprefix("https://"), ssl=True, ssl_context_factory=context)


def grpc_client(server: ServeProcess, certs: Certs) -> Any:
    assert server.grpc is not None
    port = server.grpc.rsplit(":", 1)[1]
    return grpcclient.InferenceServerClient(f"localhost:{port}", ssl=True, root_certificates=str(certs.ca),
                                            private_key=str(certs.client_key), certificate_chain=str(certs.client_cert))


def check(server: ServeProcess, certs: Certs, sample: np.ndarray[Any, Any]) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    x = np.ascontiguousarray(sample, dtype=np.float32)
    client = http_client(server, certs)
    try:
        assert client.is_server_live()  # health: open
        inp = httpclient.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("lr", [inp], headers={"Authorization": f"Bearer {APP}"})
        assert result.as_numpy("output-0").shape[0] == len(x)
        with pytest.raises(InferenceServerException, match="no 'read' scope"):
            client.get_model_metadata("lr", headers={"Authorization": f"Bearer {APP}"})
        with pytest.raises(InferenceServerException, match="missing or wrong bearer token"):
            client.infer("lr", [inp])
        assert client.get_model_metadata("lr", headers={"Authorization": f"Bearer {OPS}"})["name"] == "lr"
    finally:
        client.close()
    g = grpc_client(server, certs)
    try:
        ginp = grpcclient.InferInput("input-0", list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        out = g.infer("lr", [ginp], headers={"authorization": f"Bearer {APP}"}, client_timeout=60)
        assert out.as_numpy("output-0").shape[0] == len(x)
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED|no 'read' scope"):
            g.get_model_metadata("lr", headers={"authorization": f"Bearer {APP}"})
    finally:
        g.close()


def test_serve_flags(served_home: tuple[Path, PodRecord], sklearn_model: tuple[Path, Any, Any], certs: Certs,
                     tokens: Path) -> None:
    home, _ = served_home
    env = {"MODELPOD_LOG_LEVEL": "debug"}
    with modelpod_serve(home, "lr", "--grpc-port", "0", "--tls-cert", str(certs.server_cert), "--tls-key",
                        str(certs.server_key), "--tls-client-ca", str(certs.ca), "--token-file", str(tokens),
                        env=env) as server:
        check(server, certs, sklearn_model[1])
        server.stop()
        log = "".join(server.stderr)
    assert "bearer tokens required" in log and "app" in log
    assert APP not in log and OPS not in log  # not even at debug level


def test_serve_environment(served_home: tuple[Path, PodRecord], sklearn_model: tuple[Path, Any, Any], certs: Certs,
                           tokens: Path) -> None:
    home, _ = served_home
    env = {"MODELPOD_TLS_CERT": str(certs.server_cert), "MODELPOD_TLS_KEY": str(certs.server_key),
           "MODELPOD_TLS_CLIENT_CA": str(certs.ca), "MODELPOD_TOKEN_FILE": str(tokens)}
    with modelpod_serve(home, "lr", "--grpc-port", "0", env=env) as server:
        check(server, certs, sklearn_model[1])


def test_bad_certificate_stops_the_start(served_home: tuple[Path, PodRecord], certs: Certs) -> None:
    home, _ = served_home
    proc = subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(home), "serve", "lr", "--no-grpc", "--port",
                           "0", "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.client_key)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 2 and "key values mismatch" in proc.stderr, proc.stderr


def test_image_entry_reads_tls_from_the_environment(served_home: tuple[Path, PodRecord],
                                                    sklearn_model: tuple[Path, Any, Any], certs: Certs,
                                                    tokens: Path) -> None:
    """What ``docker run -e MODELPOD_TLS_CERT=... IMAGE`` runs: ``python -m modelpod.entry POD_DIR``."""
    from modelpod.store import Store

    home, rec = served_home
    pod_dir = Store(home).open(rec.ref).path
    env = {"MODELPOD_HOME": str(home), "MODELPOD_LOG_LEVEL": "warning", "MODELPOD_TLS_CERT": str(certs.server_cert),
           "MODELPOD_TLS_KEY": str(certs.server_key), "MODELPOD_TLS_CLIENT_CA": str(certs.ca),
           "MODELPOD_TOKEN_FILE": str(tokens)}
    argv = [str(PYTHON), "-m", "modelpod.entry", str(pod_dir), "--host", "127.0.0.1", "--port", "0",
            "--grpc-port", "0", "--json"]
    with ServeProcess(argv, env=env) as server:
        check(server, certs, sklearn_model[1])
