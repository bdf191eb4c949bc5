"""Every built image's CycloneDX SBOM checked against what its layers really hold; the SBOM and the image
signature attached as OCI referrers (layout, docker archive, the real registry) and read back."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelpod.cli import main
from modelpod.image.attach import Payload, to_layout, to_registry
from modelpod.image.oci import BlobStore, Descriptor, read_json
from modelpod.image.referrers import fallback_tag
from modelpod.image.registry import Reference, Registry
from modelpod.image.sbom import validate

pytestmark = pytest.mark.e2e
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)
SIGNATURE_TYPE = "application/vnd.modelpod.signature.v1+json"


def cli(home: Path, *args: str, json_out: bool = True) -> tuple[int, Any, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--home", str(home), *args, *(["--json"] if json_out else [])])
    text = out.getvalue()
    return rc, (json.loads(text) if json_out and rc == 0 and text.strip() else text), err.getvalue()


def keypair(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@dataclass(frozen=True)
class Signed:
    layout: Path
    sbom: Path
    data: dict[str, Any]
    key: Path
    pub: Path
    other_pub: Path


@pytest.fixture(scope="module")
def signed(sk_pod: Any, base_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Signed:
    """sk-lr built into an OCI layout, signed, its SBOM also written to a file."""
    tmp = tmp_path_factory.mktemp("signed")
    key, pub = keypair(tmp, "signer")
    _, other_pub = keypair(tmp, "stranger")
    layout, sbom = tmp / "layout", tmp / "out" / "sbom.cdx.json"
    rc, data, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", base_image.oci, "--output", f"oci:{layout}:v1",
                        "--sbom", str(sbom), "--sign-key", str(key))
    assert rc == 0, err
    return Signed(layout, sbom, data, key, pub, other_pub)


def _members(blob: Path) -> dict[str, bytes]:
    """Every regular file of a layer blob that the checks below look at."""
    out = {}
    with tarfile.open(blob, "r:*") as tar:
        for m in tar:
            if m.isfile() and (m.name.endswith(".dist-info/METADATA") or m.name == "var/lib/dpkg/status"
                               or m.name.startswith("opt/modelpod/pod/")):
                fh = tar.extractfile(m)
                out[m.name] = fh.read() if fh else b""
    return out


def _installed_debs(status: bytes, tmp: Path) -> set[tuple[str, str]]:
    """What dpkg itself says is installed (dpkg-query on the base's status file), else a plain parse."""
    admin = tmp / "dpkg"
    admin.mkdir(exist_ok=True)
    (admin / "status").write_bytes(status)
    if shutil.which("dpkg-query"):
        fmt = "${db:Status-Abbrev}|${Package}|${Version}\n"
        proc = subprocess.run(["dpkg-query", f"--admindir={admin}", "-W", "-f", fmt],
                              capture_output=True, text=True, check=True)
        return {(p, v) for s, p, v in (line.split("|") for line in proc.stdout.splitlines()) if s.startswith("ii")}
    found = set()
    for stanza in status.decode().split("\n\n"):
        f = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if f.get("Status", "").endswith(" installed"):
            found.add((f["Package"], f["Version"]))
    return found


def _prop(component: dict[str, Any], name: str) -> str:
    return str(next(p["value"] for p in component["properties"] if p["name"] == name))


def test_sbom_holds_what_the_layers_hold(signed: Signed, sk_pod: Any, tmp_path: Path) -> None:
    raw = signed.sbom.read_bytes()
    assert validate(raw) is None  # the CycloneDX 1.6 schema, through cyclonedx-python-lib's validator
    doc = json.loads(raw)
    assert doc["specVersion"] == "1.6" and doc["metadata"]["component"]["version"] == signed.data["digest"]
    blobs = signed.layout / "blobs" / "sha256"
    layers = {layer["role"]: [] for layer in signed.data["layers"]}
    for layer in signed.data["layers"]:
        layers[layer["role"]].append(_members(blobs / layer["digest"][7:]))

    # Every Python distribution installed in the runtime and deps layers, with its version, once.
    comps = doc["components"]
    in_sbom = {(c["name"].lower(), c["version"], _prop(c, "modelpod:layer"))
               for c in comps if c.get("purl", "").startswith("pkg:pypi/")}
    in_layers = set()
    for role in ("runtime", "deps"):
        for members in layers[role]:
            for name, meta in members.items():
                if re.fullmatch(rf"opt/modelpod/{role}/[^/]+\.dist-info/METADATA", name):
                    head = dict(line.split(": ", 1) for line in meta.decode().split("\n\n")[0].splitlines()
                                if ": " in line)
                    in_layers.add((head["Name"].lower(), head["Version"], role))
    assert in_sbom == in_layers
    assert {("modelpod", "runtime"), ("numpy", "runtime"), ("scikit-learn", "deps")} <= {(n, r) for n, _, r in in_sbom}
    for c in comps:
        if c.get("purl", "").startswith("pkg:pypi/"):
            assert c["purl"] == f"pkg:pypi/{c['name'].lower().replace('_', '-')}@{c['version']}"
            assert [h["alg"] for h in c["hashes"]] == ["SHA-256"]
    numpy = next(c for c in comps if c["name"].lower() == "numpy")
    assert numpy.get("licenses")  # from its metadata

    # The base's Debian packages: what dpkg says its status file holds.
    status = next(m["var/lib/dpkg/status"] for m in layers["base"] if "var/lib/dpkg/status" in m)
    debs = {(c["name"], c["version"]) for c in comps if c.get("purl", "").startswith("pkg:deb/debian/")}
    assert debs == _installed_debs(status, tmp_path)
    assert any(name.startswith("python3.11") for name, _ in debs)

    # The model files with their real sha256 (the bytes in the image, the manifest, the store's file).
    files = {c["name"]: c["hashes"][0]["content"] for c in comps if c["type"] == "file"}
    pod = sk_pod.store.open("sk-lr:1")
    for f in pod.manifest.files:
        in_image = next(m[f"opt/modelpod/pod/{f.path}"] for m in layers["weights"] + layers["pod"]
                        if f"opt/modelpod/pod/{f.path}" in m)
        assert files[f.path] == f.sha256 == hashlib.sha256(in_image).hexdigest() == \
            hashlib.sha256((pod.path / f.path).read_bytes()).hexdigest()
    model = next(c for c in comps if c["type"] == "machine-learning-model")
    assert model["name"] == "sk-lr" and model["version"] == pod.digest


def test_sbom_reads_back_from_the_layout_and_a_docker_archive(signed: Signed, sk_pod: Any, base_image: Any,
                                                              tmp_path: Path) -> None:
    rc, text, err = cli(sk_pod.home, "sbom", f"oci:{signed.layout}:v1")
    assert rc == 0, err
    assert json.dumps(text, sort_keys=True, separators=(",", ":")).encode() == signed.sbom.read_bytes()
    rc, human, err = cli(sk_pod.home, "sbom", f"oci:{signed.layout}:v1", json_out=False)
    assert rc == 0, err
    assert "python packages:" in human and "debian packages:" in human and "model.skops" in human
    assert "schema valid" in human
    # The layout's index: the image under its tag, the SBOM and the signature as referrers.
    index = read_json(signed.layout / "index.json", "index")
    kinds = sorted(m.get("artifactType", "image") for m in index["manifests"])
    assert kinds == ["application/vnd.cyclonedx+json", SIGNATURE_TYPE, "image"]

    archive = tmp_path / "image.tar"
    rc, built, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", base_image.oci,
                         "--output", f"docker-archive:{archive}")
    assert rc == 0, err
    assert built["digest"] == signed.data["digest"]
    rc, again, err = cli(sk_pod.home, "sbom", f"docker-archive:{archive}")
    assert rc == 0, err
    assert again == text  # the same image, the same document


def test_image_signature_verifies_and_tampering_is_refused(signed: Signed, sk_pod: Any, base_image: Any,
                                                           tmp_path: Path) -> None:
    spec = f"oci:{signed.layout}:v1"
    rc, ok, err = cli(sk_pod.home, "verify", spec, "--key", str(signed.pub))
    assert rc == 0, err
    assert ok["ok"] and ok["digest"] == signed.data["digest"] and ok["signer"]["kind"] == "image"
    rc, _, err = cli(sk_pod.home, "verify", spec, "--key", str(signed.other_pub))
    assert rc == 2 and "not a trusted key" in err

    # The same image with only a tampered signature: the statement names a new time, the sig is old.
    bundle = _signature(signed.layout)
    doc = json.loads(bundle)
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["signed_at"] = "2099-01-01T00:00:00Z"
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    tampered = _unsigned_copy(signed.layout, tmp_path / "tampered")
    subject = _subject(tampered)
    to_layout(tampered, subject, [Payload(SIGNATURE_TYPE, json.dumps(doc).encode(), "signature.json")],
              BlobStore(tampered / "blobs"))
    rc, _, err = cli(sk_pod.home, "verify", f"oci:{tampered}:v1", "--key", str(signed.pub))
    assert rc == 2 and "tampered" in err, err

    # A genuine signature of this image, attached to another image (another revision): refused too.
    other = tmp_path / "other"
    rc, built, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", base_image.oci, "--revision", "elsewhere",
                         "--output", f"oci:{other}:v1")
    assert rc == 0, err
    to_layout(other, _subject(other), [Payload(SIGNATURE_TYPE, bundle, "signature.json")], BlobStore(other / "blobs"))
    rc, _, err = cli(sk_pod.home, "verify", f"oci:{other}:v1", "--key", str(signed.pub))
    assert rc == 2 and "not over this digest" in err, err
    rc, _, err = cli(sk_pod.home, "verify", f"oci:{_unsigned_copy(signed.layout, tmp_path / 'bare')}:v1",
                     "--key", str(signed.pub))
    assert rc == 2 and "no signature" in err


def _subject(layout: Path) -> Descriptor:
    index = read_json(layout / "index.json", "index")
    image = next(m for m in index["manifests"] if not m.get("artifactType"))
    return Descriptor(image["mediaType"], image["digest"], image["size"])


def _signature(layout: Path) -> bytes:
    index = read_json(layout / "index.json", "index")
    ref = next(m for m in index["manifests"] if m.get("artifactType") == SIGNATURE_TYPE)
    manifest = json.loads((layout / "blobs" / "sha256" / ref["digest"][7:]).read_bytes())
    return (layout / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]).read_bytes()


def _unsigned_copy(layout: Path, dest: Path) -> Path:
    shutil.copytree(layout, dest)
    index = read_json(dest / "index.json", "index")
    index["manifests"] = [m for m in index["manifests"] if m.get("artifactType") != SIGNATURE_TYPE]
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def test_registry_referrers_attach_and_read_back(signed: Signed, sk_pod: Any, oci_registry: Any,
                                                 oci_registry_base: str) -> None:
    target = oci_registry.repo("sbom/sk-lr:v1")
    rc, data, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", oci_registry_base, "--push", target,
                        "--sign-key", str(signed.key))
    assert rc == 0, err
    kinds = sorted(a["artifactType"] for a in data["outputs"]["attached"])
    assert kinds == ["application/vnd.cyclonedx+json", SIGNATURE_TYPE]
    ref = Reference.parse(target)
    client = Registry(ref.host)
    if not any(a["referrers_api"] for a in data["outputs"]["attached"]):
        # Debian's distribution 2.8 has no referrers API: the list lives under the fallback tag.
        index, _ = client.get_manifest(ref.repository, fallback_tag(data["digest"]))
        listed = sorted(m["artifactType"] for m in json.loads(index)["manifests"])
        assert listed == kinds

    rc, doc, err = cli(sk_pod.home, "sbom", target)
    assert rc == 0, err
    assert validate(json.dumps(doc)) is None
    assert doc["metadata"]["component"]["version"] == data["digest"]
    assert {c["name"] for c in doc["components"] if c["type"] == "file"} >= \
        {f.path for f in sk_pod.record.manifest.files}

    rc, ok, err = cli(sk_pod.home, "verify", target, "--key", str(signed.pub))
    assert rc == 0, err
    assert ok["digest"] == data["digest"]

    # An image in the registry whose only signature was altered after signing: refused.
    bare = oci_registry.repo("sbom/sk-lr:bare")
    rc, pushed, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", oci_registry_base, "--push", bare,
                          "--revision", "bare", "--no-sbom")
    assert rc == 0, err
    sub = Reference.parse(bare)
    raw, media = client.get_manifest(sub.repository, "bare")
    bundle = json.loads(_signature(signed.layout))
    sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 1
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    to_registry(client, sub.repository, Descriptor(media, pushed["digest"], len(raw)),
                [Payload(SIGNATURE_TYPE, json.dumps(bundle).encode(), "signature.json")],
                BlobStore(sk_pod.home / "cache" / "blobs"))
    rc, _, err = cli(sk_pod.home, "verify", bare, "--key", str(signed.pub))
    assert rc == 2, err
    assert "does not verify" in err or "not over this digest" in err
