"""Signed and encrypted pods through a real registry and a real image build.

The CNCF distribution registry Debian packages (2.8) has no referrers API, so signatures reach it
through the referrers tag schema; the same client code reads the API where a registry has it.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.api import load
from modelpod.errors import NotSignedError
from modelpod.image.artifact import SIGNATURE_ARTIFACT, pull_pod
from modelpod.image.referrers import fallback_tag, referrers
from modelpod.image.registry import Reference, Registry
from modelpod.pod import SIGNATURES_NAME
from modelpod.settings import Settings
from modelpod.store import Store
from modelpod.trust.policy import TrustPolicy

pytestmark = pytest.mark.e2e
Kit = Any


def _keypair(root: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    root.mkdir(parents=True, exist_ok=True)
    private, public = root / "key.pem", root / "key.pub.pem"
    private.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _pieces(data: bytes, size: int = 32) -> list[bytes]:
    """The binary pieces of a weights file (coefficients, CRCs), not the JSON keys and runs of
    spaces that any layer may hold as well."""
    found = [data[i:i + size] for i in range(0, len(data) - size, 4)]
    pieces = [w for w in found if len(set(w)) >= 20 and sum(1 for b in w if b < 0x20 or b > 0x7E) >= 12]
    assert len(pieces) >= 8
    return pieces


def _holds(data: bytes, pieces: list[bytes]) -> bool:
    return any(piece in data for piece in pieces)


def _contents(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _copy_home(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("cache"))
    return dest


@pytest.fixture
def cli(kit: Kit, capsys: pytest.CaptureFixture[str]) -> Any:
    return lambda home, *args: kit.cli(capsys, home, *args)


def test_signed_pod_push_pull_with_referrers(sk_pod: Any, oci_registry: Any, tmp_path: Path, cli: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    home = _copy_home(sk_pod.home, tmp_path / "home")
    private, public = _keypair(tmp_path / "keys")
    rc, _, err = cli(home, "sign", "sk-lr:1", "--key", str(private))
    assert rc == 0, err
    target = oci_registry.repo("trust/signed")
    rc, pushed, err = cli(home, "push", "sk-lr:1", target)
    assert rc == 0, err
    assert pushed["signatures"] == 1
    ref = Reference.parse(target)
    client = Registry(ref.host)
    found = referrers(client, ref.repository, pushed["digest"], SIGNATURE_ARTIFACT)
    assert len(found) == 1 and found[0].artifact_type == SIGNATURE_ARTIFACT
    if client.get_referrers(ref.repository, pushed["digest"]) is None:  # Debian's 2.8: the fallback tag
        client.get_manifest(ref.repository, fallback_tag(pushed["digest"]))
    # A second push attaches nothing new.
    rc, _, err = cli(home, "push", "sk-lr:1", target)
    assert rc == 0, err
    assert len(referrers(client, ref.repository, pushed["digest"], SIGNATURE_ARTIFACT)) == 1

    fresh = tmp_path / "fresh"
    monkeypatch.setenv("MODELPOD_TRUST_KEYS", str(public))
    rc, pulled, err = cli(fresh, "pull", f"{target}:1")
    assert rc == 0, err
    assert pulled["digest"] == sk_pod.record.digest
    rc, report, err = cli(fresh, "verify", "sk-lr:1", "--signature", "--key", str(public))
    assert rc == 0 and report["signatures"][0]["trusted"], err
    settings = Settings(home=fresh, trust_keys=str(public), require_signed=True)
    assert load("sk-lr:1", settings=settings).loaded


def test_pull_refuses_an_unsigned_pod_and_stores_nothing(sk_pod: Any, oci_registry: Any, tmp_path: Path,
                                                          cli: Any) -> None:
    _, public = _keypair(tmp_path / "keys")
    target = oci_registry.repo("trust/unsigned")
    rc, _, err = cli(sk_pod.home, "push", "sk-lr:1", target)
    assert rc == 0, err
    fresh = Store(tmp_path / "fresh")
    policy = TrustPolicy.from_settings(Settings(home=fresh.home, trust_keys=str(public)))
    ref = Reference.parse(f"{target}:1")
    with pytest.raises(NotSignedError, match=f"pod sk-lr from {ref}"):
        pull_pod(ref, Registry(ref.host), fresh, policy)
    assert fresh.list() == [] and not any(fresh.blobs.iterdir())


def test_encrypted_weights_are_in_no_registry_blob_and_no_image_layer(
        sk_pod: Any, sklearn_model: tuple[Path, np.ndarray, object], base_image: Any, tmp_path: Path,
        cli: Any, kit: Kit) -> None:
    home = _copy_home(sk_pod.home, tmp_path / "home")
    kit.shared_wheels(home)
    key = tmp_path / "pod.key"
    key.write_bytes(os.urandom(32))
    rc, enc, err = cli(home, "encrypt", "sk-lr:1", "--key", str(key))
    assert rc == 0, err
    rc, _, err = cli(home, "rm", "sk-lr:1")  # the plaintext version goes; only ciphertext remains
    assert rc == 0, err
    private, public = _keypair(tmp_path / "keys")
    rc, _, err = cli(home, "sign", enc["name"] + ":" + str(enc["version"]), "--key", str(private))
    assert rc == 0, err
    plaintext = sklearn_model[0].read_bytes()
    pieces = _pieces(plaintext)
    assert all(piece in plaintext for piece in pieces)
    ref = f"sk-lr:{enc['version']}"
    weights = next(f for f in Store(home).get(ref).manifest.files if f.role == "weights")

    # A registry of our own, so every blob it holds can be read from its disk.
    proc, host = kit.start_registry(tmp_path / "registry")
    try:
        rc, pushed, err = cli(home, "push", ref, f"{host}/trust/encrypted")
        assert rc == 0, err
        blobs = [p for p in (tmp_path / "registry" / "data").rglob("data") if p.is_file()]
        assert len(blobs) >= 4  # config, layers, the signature referrer and its index
        contents = [_contents(p) for p in blobs]
        assert not [str(p) for p, data in zip(blobs, contents, strict=True) if _holds(data, pieces)]
        cipher = (Store(home).open(ref).path / weights.path).read_bytes()
        assert any(cipher[:64] in data for data in contents)  # the weights are there, as ciphertext
    finally:
        kit.stop(proc)

    out = tmp_path / "layout"
    rc, built, err = cli(home, "build", ref, "--base", base_image.oci, "--output", f"oci:{out}:v1")
    assert rc == 0, err
    assert built["load_check"] != "passed"  # no key in a build: the check is skipped
    names: list[str] = []
    for path in (out / "blobs" / "sha256").iterdir():
        data = _contents(path)  # each blob read (and unzipped) once
        assert not _holds(data, pieces), f"plaintext weights in image blob {path.name}"
        if _is_tar(data):
            names += _names(data)
    assert any(n.endswith("pod/" + SIGNATURES_NAME) for n in names)  # signatures travel into the image
    assert any("cryptography/" in n for n in names)  # the runtime can verify and decrypt


def _names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def _is_tar(data: bytes) -> bool:
    return len(data) > 512 and data[257:262] == b"ustar"
