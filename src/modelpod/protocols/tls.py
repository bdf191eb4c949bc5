"""TLS for REST and gRPC: one set of PEM files, read and checked once at start.

``--tls-cert FILE --tls-key FILE`` (``MODELPOD_TLS_CERT``/``MODELPOD_TLS_KEY``) serve HTTPS and gRPC
over TLS (1.2 at least); ``--tls-client-ca FILE`` (``MODELPOD_TLS_CLIENT_CA``) also requires every
client to present a certificate signed by that CA (mutual TLS), on both protocols. A file that
cannot be read, a key that does not match the certificate, or a certificate past its end date
stops the start with the file named. The handshake of a new connection must finish within the
header timeout; a plain-HTTP request to the TLS port fails its handshake and is closed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpod.errors import UsageError

if TYPE_CHECKING:
    from modelpod.settings import Settings


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of the server's certificate chain, its key and (for mTLS) the client CA."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    cert_path: Path
    key_path: Path
    client_ca_path: Path | None

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """The TLS files of ``settings`` (None: plain), checked: both or neither, readable, matching."""
        cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        if cert is None and key is None:
            if ca is not None:
                raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (MODELPOD_TLS_CERT, MODELPOD_TLS_KEY)")
            return None
        if cert is None or key is None:
            raise UsageError("--tls-cert and --tls-key go together (MODELPOD_TLS_CERT, MODELPOD_TLS_KEY)")
        files = cls(_read(cert, "--tls-cert"), _read(key, "--tls-key"), _read(ca, "--tls-client-ca") if ca else None,
                    cert, key, ca)
        _check_dates(files.cert, cert)
        files.ssl_context()  # the key must match the certificate; the CA must parse
        return files

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for asyncio (REST)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        except ssl.SSLError as exc:
            raise UsageError(f"--tls-cert {self.cert_path} / --tls-key {self.key_path}: {_reason(exc)} "
                             "(is the key the certificate's, both PEM?)") from None
        except OSError as exc:
            raise UsageError(f"--tls-cert {self.cert_path}: cannot read it: {exc.strerror or exc}") from None
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
            except ssl.SSLError as exc:
                raise UsageError(f"--tls-client-ca {self.client_ca_path}: {_reason(exc)} "
                                 "(a PEM CA certificate?)") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def grpc_credentials(self) -> Any:
        """``grpc.ServerCredentials`` of the same files; client certificates required with a client CA."""
        import grpc

        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _read(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise UsageError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc).replace("_", " ").lower()


def _check_dates(pem: bytes, path: Path) -> None:
    """Refuse a server certificate outside its validity (with ``cryptography``; skipped without it)."""
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - cryptography comes with most installs
        return
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UsageError(f"--tls-cert {path}: not a PEM certificate: {exc}") from None
    now = datetime.now(timezone.utc)
    if cert.not_valid_after_utc < now:
        raise UsageError(f"--tls-cert {path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise UsageError(f"--tls-cert {path}: the certificate is not valid before "
                         f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
