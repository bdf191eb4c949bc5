"""Signing keys, verification keys and certificates read from PEM files (``cryptography``).

Signing keys are ECDSA P-256 or Ed25519 private keys (PKCS#8, or the "EC PRIVATE KEY" form
``openssl ecparam -genkey`` writes). A trusted key is a public key, a private key (its public
half is used), or an X.509 certificate: a CA certificate trusts every chain that ends at it, a leaf
certificate trusts its own key. A key's id is ``sha256:`` of its DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpod.errors import MissingExtraError, TrustKeyError

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----\s*", re.S)

# ``cryptography`` types are Any here: the module imports it lazily (the ``trust`` extra).
PrivateKey = Any
PublicKey = Any
Certificate = Any
KeySource = str | Path | bytes


def crypto() -> Any:
    """The ``cryptography`` package, or the one-line install hint."""
    try:
        import cryptography.hazmat.primitives.asymmetric.ec
        import cryptography.x509
    except ImportError:
        raise MissingExtraError("trust", "cryptography", "signing, verifying and encrypting pods") from None
    import cryptography

    return cryptography


def algorithm_of(key: Any, what: str = "key") -> str:
    """``ecdsa-p256-sha256`` or ``ed25519``; TrustKeyError naming the type for anything else."""
    crypto()
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, ec.SECP256R1):
            return "ecdsa-p256-sha256"
        raise TrustKeyError(f"{what}: EC keys on curve {key.curve.name} are not supported; modelpod signs with "
                            "ECDSA P-256 (prime256v1) or Ed25519 keys")
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    kind = type(key).__name__.lstrip("_").replace("PrivateKey", " private").replace("PublicKey", " public")
    raise TrustKeyError(f"{what}: {kind} keys are not supported; modelpod signs with ECDSA P-256 or Ed25519 keys "
                        "(openssl genpkey -algorithm ed25519 -out key.pem)")


def key_id(public: Any) -> str:
    crypto()
    from cryptography.hazmat.primitives import serialization

    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def public_pem(public: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return str(public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii"))


def _read(source: KeySource, what: str) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, what
    path = Path(source).expanduser()
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise TrustKeyError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None


def pem_blocks(data: bytes, label: str) -> list[tuple[str, bytes]]:
    blocks = [(m.group(1).decode(), m.group(0)) for m in _PEM.finditer(data)]
    if not blocks:
        raise TrustKeyError(f"{label}: no PEM block in it (want -----BEGIN PRIVATE KEY-----, PUBLIC KEY or "
                            "CERTIFICATE)")
    return blocks


def load_private_key(source: KeySource, password: bytes | None = None) -> PrivateKey:
    """The one private key in a PEM file, checked to be P-256 or Ed25519."""
    crypto()
    from cryptography.hazmat.primitives import serialization

    data, label = _read(source, "signing key")
    blocks = [b for kind, b in pem_blocks(data, label) if kind.endswith("PRIVATE KEY")]
    if not blocks:
        raise TrustKeyError(f"{label}: holds no private key (a public key or certificate cannot sign)")
    try:
        key = serialization.load_pem_private_key(blocks[0], password=password)
    except (ValueError, TypeError) as exc:
        raise TrustKeyError(f"{label}: not a usable private key: {exc}") from None
    algorithm_of(key, label)
    return key


def load_certificates(source: KeySource) -> list[Certificate]:
    """Every certificate in a PEM file, in file order (leaf first for a chain)."""
    crypto()
    from cryptography import x509

    data, label = _read(source, "certificate chain")
    certs = []
    for kind, block in pem_blocks(data, label):
        if kind != "CERTIFICATE":
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise TrustKeyError(f"{label}: a certificate cannot be read: {exc}") from None
    if not certs:
        raise TrustKeyError(f"{label}: holds no CERTIFICATE block")
    return certs


@dataclass(frozen=True)
class TrustedKey:
    """One trusted public key (``ca``: a CA certificate, which trusts the chains ending at it)."""

    public: Any
    id: str
    algorithm: str
    source: str
    certificate: Any = field(default=None, compare=False)
    ca: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"keyid": self.id, "algorithm": self.algorithm, "source": self.source, "ca": self.ca}


def is_ca(cert: Any) -> bool:
    from cryptography import x509

    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def load_trusted(sources: Iterable[KeySource]) -> list[TrustedKey]:
    """Trusted keys from PEM files (public keys, private keys, certificates), each checked for type."""
    crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    keys: list[TrustedKey] = []
    public: Any
    for source in sources:
        data, label = _read(source, "trusted key")
        for kind, block in pem_blocks(data, label):
            try:
                if kind == "CERTIFICATE":
                    cert = x509.load_pem_x509_certificate(block)
                    public, ca = cert.public_key(), is_ca(cert)
                elif kind.endswith("PRIVATE KEY"):
                    cert, ca = None, False
                    public = serialization.load_pem_private_key(block, password=None).public_key()
                elif kind == "PUBLIC KEY":
                    cert, ca = None, False
                    public = serialization.load_pem_public_key(block)
                else:
                    raise TrustKeyError(f"{label}: a {kind} block; want PUBLIC KEY or CERTIFICATE")
            except (ValueError, TypeError) as exc:
                raise TrustKeyError(f"{label}: a {kind} that cannot be read: {exc}") from None
            keys.append(TrustedKey(public, key_id(public), algorithm_of(public, label), label, cert, ca))
    return keys


def describe(cert: Any) -> str:
    """A certificate's subject as RFC 4514 text."""
    return str(cert.subject.rfc4514_string())


def chain_der(certs: Sequence[Any]) -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    return [c.public_bytes(serialization.Encoding.DER) for c in certs]
