"""Keys and certificates for the trust tests, made here (imported by the tests and conftest)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class KeyPair:
    private: Path
    public: Path
    key: Any


class Keys:
    """Writes PEM keys and certificates into a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def pair(self, name: str, kind: str = "ec") -> KeyPair:
        from cryptography.hazmat.primitives import serialization as s
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        key: Any
        if kind == "ec":
            key = ec.generate_private_key(ec.SECP256R1())
        elif kind == "p384":
            key = ec.generate_private_key(ec.SECP384R1())
        elif kind == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = self.root / f"{name}.pem"
        public = self.root / f"{name}.pub.pem"
        private.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
        return KeyPair(private, public, key)

    def cert(self, name: str, subject_key: KeyPair, issuer_key: KeyPair | None = None, issuer_name: str | None = None,
             ca: bool = False, days: tuple[int, int] = (-1, 30)) -> Path:
        """A certificate for ``subject_key``, signed by ``issuer_key`` (self-signed without one),
        valid from ``days[0]`` to ``days[1]`` days from now."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        now = dt.datetime.now(dt.timezone.utc)
        signer = issuer_key or subject_key
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
            .public_key(subject_key.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days[0]))
            .not_valid_after(now + dt.timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        algorithm = None if type(signer.key).__name__.startswith("Ed25519") else hashes.SHA256()
        cert = builder.sign(signer.key, algorithm)
        path = self.root / f"{name}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path
