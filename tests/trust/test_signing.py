"""Signatures over a digest: every refusal the issue lists has its test here."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from trustkit import Keys

from modelpod.errors import BadSignatureError, TrustKeyError, UntrustedSignerError
from modelpod.trust.keys import load_trusted
from modelpod.trust.signing import PAYLOAD_TYPE, STATEMENT_TYPE, inspect, pae, sign_digest, verify

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


@pytest.mark.parametrize("kind", ["ec", "ed25519"])
def test_sign_then_verify_names_who_signed_what(keys: Keys, kind: str) -> None:
    pair = keys.pair("alice", kind)
    bundle = sign_digest(DIGEST, pair.private, name="lr")
    signer = verify(bundle, DIGEST, load_trusted([pair.public]))
    assert signer.trusted and signer.digest == DIGEST and signer.name == "lr" and signer.kind == "pod"
    assert signer.algorithm == ("ed25519" if kind == "ed25519" else "ecdsa-p256-sha256")
    assert signer.trusted_by == str(pair.public)
    # The envelope is a DSSE envelope over an in-toto v1 statement whose subject is the digest.
    doc = json.loads(bundle)
    envelope = doc["dsseEnvelope"]
    assert envelope["payloadType"] == PAYLOAD_TYPE
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["subject"] == [{"name": "lr", "digest": {"sha256": DIGEST[7:]}}]
    assert envelope["signatures"][0]["keyid"] == signer.keyid


def test_dsse_pae_is_the_spec_encoding() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_a_private_key_file_also_serves_as_a_trusted_key(keys: Keys) -> None:
    pair = keys.pair("alice")
    bundle = sign_digest(DIGEST, pair.private, name="lr")
    assert verify(bundle, DIGEST, load_trusted([pair.private])).trusted


def test_tampered_payload_is_refused(keys: Keys) -> None:
    pair = keys.pair("alice")
    doc = json.loads(sign_digest(DIGEST, pair.private, name="lr"))
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["subject"][0]["digest"]["sha256"] = OTHER[7:]  # point a good signature at another pod
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(BadSignatureError, match="tampered"):
        verify(json.dumps(doc).encode(), OTHER, load_trusted([pair.public]))


def test_tampered_signature_bytes_are_refused(keys: Keys) -> None:
    pair = keys.pair("alice", "ed25519")
    doc = json.loads(sign_digest(DIGEST, pair.private, name="lr"))
    sig = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[5] ^= 0x01
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(BadSignatureError, match="does not verify"):
        verify(json.dumps(doc).encode(), DIGEST, load_trusted([pair.public]))


def test_swapped_key_in_the_bundle_is_refused(keys: Keys) -> None:
    alice, mallory = keys.pair("alice"), keys.pair("mallory")
    doc = json.loads(sign_digest(DIGEST, mallory.private, name="lr"))
    doc["verificationMaterial"]["publicKey"] = alice.public.read_text()  # claim to be alice
    with pytest.raises(BadSignatureError):
        verify(json.dumps(doc).encode(), DIGEST, load_trusted([alice.public]))


@pytest.mark.parametrize("cut", [1, 40, 300])
def test_truncated_envelope_is_refused(keys: Keys, cut: int) -> None:
    pair = keys.pair("alice")
    bundle = sign_digest(DIGEST, pair.private, name="lr")
    with pytest.raises(BadSignatureError, match="truncated"):
        verify(bundle[:-cut], DIGEST, load_trusted([pair.public]))


def test_signature_over_another_digest_is_refused(keys: Keys) -> None:
    pair = keys.pair("alice")
    bundle = sign_digest(OTHER, pair.private, name="lr")
    with pytest.raises(BadSignatureError, match=f"over {OTHER}, not over this digest {DIGEST}"):
        verify(bundle, DIGEST, load_trusted([pair.public]))


def test_unknown_key_is_refused_naming_the_key(keys: Keys) -> None:
    alice, bob = keys.pair("alice"), keys.pair("bob")
    bundle = sign_digest(DIGEST, bob.private, name="lr")
    with pytest.raises(UntrustedSignerError, match="not a trusted key") as info:
        verify(bundle, DIGEST, load_trusted([alice.public]), what="pod lr:1")
    assert "pod lr:1" in str(info.value) and inspect(bundle).keyid in str(info.value)


@pytest.mark.parametrize("kind", ["rsa", "p384"])
def test_wrong_key_type_is_refused_at_signing(keys: Keys, kind: str) -> None:
    pair = keys.pair("odd", kind)
    with pytest.raises(TrustKeyError, match="not supported; modelpod signs with ECDSA P-256.* or Ed25519"):
        sign_digest(DIGEST, pair.private, name="lr")
    with pytest.raises(TrustKeyError, match="not supported"):
        load_trusted([pair.public])


def test_a_public_key_cannot_sign_and_garbage_is_not_a_key(keys: Keys) -> None:
    pair = keys.pair("alice")
    with pytest.raises(TrustKeyError, match="no private key"):
        sign_digest(DIGEST, pair.public, name="lr")
    junk = keys.root / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(TrustKeyError, match="no PEM block"):
        load_trusted([junk])


def test_certificate_chain_to_a_trusted_ca(keys: Keys) -> None:
    ca = keys.pair("ca")
    ca_cert = keys.cert("Example Root", ca, ca=True)
    inter = keys.pair("inter")
    inter_cert = keys.cert("Example Signing CA", inter, ca, "Example Root", ca=True)
    leaf = keys.pair("leaf", "ed25519")
    leaf_cert = keys.cert("release-bot", leaf, inter, "Example Signing CA")
    chain = keys.root / "chain.pem"
    chain.write_bytes(leaf_cert.read_bytes() + inter_cert.read_bytes())
    bundle = sign_digest(DIGEST, leaf.private, name="lr", chain=chain)
    signer = verify(bundle, DIGEST, load_trusted([ca_cert]))
    assert signer.trusted and signer.certificate == "CN=release-bot" and signer.issuer == "CN=Example Signing CA"
    # Another CA does not vouch for it.
    other = keys.pair("other")
    with pytest.raises(UntrustedSignerError):
        verify(bundle, DIGEST, load_trusted([keys.cert("Other Root", other, ca=True)]))


def test_expired_certificate_is_refused(keys: Keys) -> None:
    ca = keys.pair("ca")
    ca_cert = keys.cert("Example Root", ca, ca=True, days=(-30, 365))
    leaf = keys.pair("leaf")
    short = keys.cert("release-bot", leaf, ca, "Example Root", days=(-10, 1))
    bundle = sign_digest(DIGEST, leaf.private, name="lr", chain=short)  # valid at signing
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3)
    with pytest.raises(BadSignatureError, match="certificate CN=release-bot expired at"):
        verify(bundle, DIGEST, load_trusted([ca_cert]), now=later)
    expired = keys.cert("old-bot", leaf, ca, "Example Root", days=(-10, -1))
    with pytest.raises(BadSignatureError, match="expired"):
        sign_digest(DIGEST, leaf.private, name="lr", chain=expired)


def test_certificate_for_another_key_is_refused(keys: Keys) -> None:
    leaf, other = keys.pair("leaf"), keys.pair("other")
    cert = keys.cert("someone", other)
    with pytest.raises(TrustKeyError, match="not for this signing key"):
        sign_digest(DIGEST, leaf.private, name="lr", chain=cert)
