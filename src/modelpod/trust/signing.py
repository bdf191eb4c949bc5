"""Sign and verify a digest: a DSSE envelope whose payload is an in-toto v1 statement.

Why not the OpenSSF ``model-signing`` format: it signs a directory, its statement's subject being
the model and its predicate every file's hash, computed by its own walk of the directory (it would
hash ``modelpod.yaml`` and whatever else lies there, and its digest is not our pod digest). Our pod
digest already covers every file (the manifest lists each sha256), so the statement here names the
pod digest itself as the subject, which is also what an image signature needs (the manifest
digest). The envelope is the same DSSE + in-toto v1 pair model-signing and cosign attestations use,
inside a small bundle in the shape of a sigstore bundle::

    {"mediaType": "application/vnd.modelpod.signature.v1+json",
     "verificationMaterial": {"publicKey": PEM, "certificates": [PEM leaf, PEM intermediate...]},
     "dsseEnvelope": {"payloadType": "application/vnd.in-toto+json", "payload": b64(statement),
                      "signatures": [{"keyid": "sha256:<spki hash>", "sig": b64}]}}

    statement = {"_type": "https://in-toto.io/Statement/v1",
                 "subject": [{"name": NAME, "digest": {"sha256": HEX}}],
                 "predicateType": "https://modelpod.dev/signature/v1",
                 "predicate": {"kind": "pod" | "image", "signed_at": ISO-8601, ...}}

The signature is over DSSE's pre-authentication encoding (``DSSEv1 len type len payload``), ECDSA
P-256 with SHA-256 (DER-encoded) or Ed25519. The verification material only says which key made
the signature; whether that key is trusted is the verifier's list (``trust.keys``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpod.errors import BadSignatureError, TrustKeyError, UntrustedSignerError
from modelpod.pod import canonical_json
from modelpod.trust.keys import (
    KeySource,
    TrustedKey,
    algorithm_of,
    chain_der,
    crypto,
    describe,
    key_id,
    load_certificates,
    load_private_key,
    public_pem,
)

BUNDLE_MEDIA_TYPE = "application/vnd.modelpod.signature.v1+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://modelpod.dev/signature/v1"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class Signer:
    """Who signed what: the result of a verification (``trusted`` False from ``inspect``)."""

    keyid: str
    algorithm: str
    name: str  # the statement's subject name (the pod name, or the image reference)
    digest: str  # the digest the statement names
    kind: str  # pod | image
    signed_at: str
    certificate: str | None = None  # the leaf certificate's subject
    issuer: str | None = None
    not_after: str | None = None
    trusted: bool = False
    trusted_by: str | None = None  # the trusted key or CA file that vouched for it

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self) -> str:
        who = self.certificate or self.keyid
        return f"{self.kind} {self.name} {self.digest} signed by {who} ({self.algorithm}) at {self.signed_at}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def sign_digest(digest: str, key: KeySource | Any, *, name: str, kind: str = "pod",
                chain: KeySource | Sequence[Any] | None = None, password: bytes | None = None,
                predicate: Mapping[str, Any] | None = None, now: dt.datetime | None = None) -> bytes:
    """A signature bundle over ``digest`` (``sha256:<hex>``), made with a P-256 or Ed25519 key.

    ``chain``: the signer's certificate first, then intermediates; its leaf must hold the key's
    public half and be valid now."""
    crypto()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if not _DIGEST.fullmatch(digest):
        raise BadSignatureError(f"cannot sign {digest!r}: not a sha256:<64 hex> digest")
    private = load_private_key(key, password) if isinstance(key, (str, bytes, Path)) else key
    algorithm = algorithm_of(private, "signing key")
    public = private.public_key()
    material: dict[str, Any] = {"publicKey": public_pem(public)}
    when = now or _now()
    if chain is not None:
        certs = load_certificates(chain) if isinstance(chain, (str, bytes, Path)) else list(chain)
        if key_id(certs[0].public_key()) != key_id(public):
            raise TrustKeyError(f"certificate {describe(certs[0])} is not for this signing key "
                                "(its public key differs); put the signer's certificate first in the chain")
        _check_validity(certs, when)
        material["certificates"] = [_pem(der) for der in chain_der(certs)]
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"kind": kind, "signed_at": when.strftime("%Y-%m-%dT%H:%M:%SZ"), **dict(predicate or {})},
    }
    payload = canonical_json(statement)
    message = pae(PAYLOAD_TYPE, payload)
    sig = private.sign(message) if algorithm == "ed25519" else private.sign(message, ec.ECDSA(hashes.SHA256()))
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": _b64(payload),
                "signatures": [{"keyid": key_id(public), "sig": _b64(sig)}]}
    return canonical_json({"mediaType": BUNDLE_MEDIA_TYPE, "verificationMaterial": material,
                           "dsseEnvelope": envelope})


def inspect(bundle: bytes, now: dt.datetime | None = None) -> Signer:
    """Check a bundle against its own key (not against any trust list): who signed what.

    Raises BadSignatureError for a truncated, malformed or tampered bundle, and for a certificate
    that is expired or not yet valid."""
    crypto()
    doc = _json(bundle, "signature")
    if not isinstance(doc, dict) or doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise BadSignatureError(f"signature: not a modelpod signature bundle (mediaType "
                                f"{doc.get('mediaType') if isinstance(doc, dict) else None!r})")
    envelope, material = doc.get("dsseEnvelope"), doc.get("verificationMaterial")
    if not isinstance(envelope, dict) or not isinstance(material, dict):
        raise BadSignatureError("signature: the bundle has no dsseEnvelope or verificationMaterial")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise BadSignatureError(f"signature: payloadType {envelope.get('payloadType')!r}, want {PAYLOAD_TYPE}")
    payload = _unb64(envelope.get("payload"), "payload")
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or not sigs or not isinstance(sigs[0], dict):
        raise BadSignatureError("signature: the envelope holds no signatures")
    certs = [_load_cert(text) for text in material.get("certificates") or ()]
    public = certs[0].public_key() if certs else _load_public(material.get("publicKey"))
    algorithm = algorithm_of(public, "the signature's key")
    keyid = key_id(public)
    if sigs[0].get("keyid") not in (None, "", keyid):
        raise BadSignatureError(f"signature: keyid {sigs[0].get('keyid')} does not match its key {keyid}")
    _check_sig(public, algorithm, _unb64(sigs[0].get("sig"), "sig"), pae(PAYLOAD_TYPE, payload))
    statement = _json(payload, "signature payload")
    name, digest, predicate = _statement(statement)
    leaf = certs[0] if certs else None
    if certs:
        _check_validity(certs, now or _now())
    return Signer(keyid=keyid, algorithm=algorithm, name=name, digest=digest,
                  kind=str(predicate.get("kind") or "pod"), signed_at=str(predicate.get("signed_at") or ""),
                  certificate=describe(leaf) if leaf is not None else None,
                  issuer=leaf.issuer.rfc4514_string() if leaf is not None else None,
                  not_after=leaf.not_valid_after_utc.isoformat() if leaf is not None else None)


def verify(bundle: bytes, digest: str, keys: Sequence[TrustedKey], *, what: str = "",
           now: dt.datetime | None = None) -> Signer:
    """The Signer when ``bundle`` is a valid signature over ``digest`` by a trusted key (or by a
    certificate chaining to a trusted CA certificate); else BadSignatureError or UntrustedSignerError.

    ``what`` names the thing verified in messages (``pod lr:3``)."""
    label = f"{what}: " if what else ""
    try:
        signer = inspect(bundle, now)
    except BadSignatureError as exc:
        raise BadSignatureError(f"{label}{exc}") from None
    if signer.digest != digest:
        raise BadSignatureError(f"{label}the signature is over {signer.digest}, not over this digest {digest} "
                                "(a signature of another pod or version)")
    for key in keys:
        if not key.ca and key.id == signer.keyid:
            return _trusted(signer, key)
    certs = [_load_cert(text) for text in (_json(bundle, "signature").get("verificationMaterial") or {})
             .get("certificates") or ()]
    if certs:
        for key in keys:
            if key.ca and _chains_to(certs, key):
                return _trusted(signer, key)
    known = ", ".join(sorted({k.source for k in keys})) or "none configured"
    raise UntrustedSignerError(f"{label}signed by {signer.certificate or 'key'} {signer.keyid}, which is not a "
                               f"trusted key (trusted: {known})")


def _trusted(signer: Signer, key: TrustedKey) -> Signer:
    from dataclasses import replace

    return replace(signer, trusted=True, trusted_by=key.source)


def _chains_to(certs: Sequence[Any], ca: TrustedKey) -> bool:
    """Each certificate is issued by the next, and the last one is the CA or issued by it."""
    for child, parent in zip(certs, certs[1:], strict=False):
        if not _issued_by(child, parent):
            return False
    last = certs[-1]
    return bool(key_id(last.public_key()) == ca.id or _issued_by(last, ca.certificate))


def _issued_by(child: Any, parent: Any) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except Exception:  # InvalidSignature, a wrong issuer and unsupported key types alike
        return False
    return True


def _check_validity(certs: Sequence[Any], now: dt.datetime) -> None:
    for cert in certs:
        if now > cert.not_valid_after_utc:
            raise BadSignatureError(f"certificate {describe(cert)} expired at "
                                    f"{cert.not_valid_after_utc.isoformat()}")
        if now < cert.not_valid_before_utc:
            raise BadSignatureError(f"certificate {describe(cert)} is not valid before "
                                    f"{cert.not_valid_before_utc.isoformat()}")


def _check_sig(public: Any, algorithm: str, sig: bytes, message: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if algorithm == "ed25519":
            public.verify(sig, message)
        else:
            public.verify(sig, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadSignatureError("the signature does not verify: the envelope was changed after signing "
                                "(tampered) or made with another key") from None


def _statement(statement: Any) -> tuple[str, str, Mapping[str, Any]]:
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise BadSignatureError(f"signature: the payload is not an in-toto v1 statement ({STATEMENT_TYPE})")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise BadSignatureError(f"signature: predicateType {statement.get('predicateType')!r}, want {PREDICATE_TYPE}")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise BadSignatureError("signature: the statement must name exactly one subject")
    hexdigest = (subjects[0].get("digest") or {}).get("sha256")
    if not isinstance(hexdigest, str) or not _DIGEST.fullmatch(f"sha256:{hexdigest}"):
        raise BadSignatureError("signature: the statement's subject has no sha256 digest")
    predicate = statement.get("predicate")
    return str(subjects[0].get("name") or ""), f"sha256:{hexdigest}", predicate if isinstance(predicate, dict) else {}


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BadSignatureError(f"{what}: truncated or not JSON ({len(data)} bytes)") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise BadSignatureError(f"signature: {what} is missing")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignatureError(f"signature: {what} is not valid base64 (truncated?)") from None


def _pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def _load_cert(text: Any) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(str(text).encode())
    except ValueError:
        raise BadSignatureError("signature: a certificate in the bundle cannot be read") from None


def _load_public(text: Any) -> Any:
    from cryptography.hazmat.primitives import serialization

    if not isinstance(text, str):
        raise BadSignatureError("signature: the bundle carries no public key or certificate")
    try:
        return serialization.load_pem_public_key(text.encode())
    except ValueError:
        raise BadSignatureError("signature: the bundle's public key cannot be read") from None
