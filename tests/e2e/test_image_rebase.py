"""``modelpod rebase``: an image built on base A moved onto base B (A plus a "security update" layer)
without a rebuild: modelpod layers byte for byte, the image a build on B gives, run by Docker."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelpod.cli import main
from modelpod.image.oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BlobStore,
    Descriptor,
    Image,
    read_layout,
    to_json,
    write_layout,
)
from modelpod.image.tarball import Entry, file_entry, write_layer

pytestmark = pytest.mark.e2e
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)
PATCH = b"Package: modelpod-test-patch\nStatus: install ok installed\nArchitecture: all\nVersion: 1.0-1\n"


def cli(home: Path, *args: str) -> tuple[int, Any, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--home", str(home), *args, "--json"])
    return rc, (json.loads(out.getvalue()) if rc == 0 and out.getvalue().strip() else None), err.getvalue()


def derived_base(base: Any, directory: Path, entries: list[Entry], what: str) -> str:
    """Base A plus one layer of ``entries``, as an OCI layout; its ``oci:`` spec."""
    src = BlobStore(base.layout / "blobs")
    data, _ = read_layout(base.layout, "bookworm")
    manifest = json.loads(data)
    config = json.loads(src.path(manifest["config"]["digest"]).read_bytes())
    store = BlobStore(directory / "blobs")
    with store.writer() as w:
        got = write_layer(entries, w)
        w.finish(got.digest)
    config["rootfs"]["diff_ids"].append(got.diff_id)
    config["history"].append({"created": "1970-01-01T00:00:00Z", "created_by": what})
    raw = to_json(config)
    config_desc = Descriptor(OCI_CONFIG, store.put_bytes(raw), len(raw))
    layers = [*(Descriptor.from_dict(d) for d in manifest["layers"]), Descriptor(OCI_LAYER_GZIP, got.digest, got.size)]
    for d in layers[:-1]:
        with src.path(d.digest).open("rb") as fh, store.writer() as w:
            while block := fh.read(1 << 20):
                w.write(block)
            w.finish(d.digest)
    doc = to_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_dict(),
                   "layers": [d.to_dict() for d in layers]})
    write_layout(directory / "layout", Image(doc, OCI_MANIFEST, config_desc, tuple(layers)), store, "b")
    return f"oci:{directory / 'layout'}:b"


def _status(base: Any) -> bytes:
    data, _ = read_layout(base.layout, "bookworm")
    layer = json.loads(data)["layers"][0]["digest"]
    with tarfile.open(base.layout / "blobs" / "sha256" / layer[7:], "r:*") as tar:
        fh = tar.extractfile("var/lib/dpkg/status")
        assert fh is not None
        return fh.read()


@dataclass(frozen=True)
class Bases:
    b: str  # A + a patch layer (a new dpkg status, a marker file)
    wrong_python: str  # A whose python3.11 is gone and a python3.12 in its place


@pytest.fixture(scope="module")
def bases(base_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Bases:
    tmp = tmp_path_factory.mktemp("bases")
    patched = derived_base(base_image, tmp / "b", [
        file_entry("var/lib/dpkg/status", _status(base_image).rstrip(b"\n") + b"\n\n" + PATCH),
        file_entry("etc/modelpod-test-patch", b"patched\n"),
    ], "apply a security update")
    wrong = derived_base(base_image, tmp / "c", [
        file_entry("usr/bin/.wh.python3.11", b""), file_entry("usr/bin/.wh.python3", b""),
        file_entry("usr/bin/python3.12", b"#!/bin/sh\n", executable=True),
        Entry("usr/bin/python3", "symlink", 0o777, linkname="python3.12"),
    ], "swap the interpreter")
    return Bases(patched, wrong)


@pytest.fixture(scope="module")
def on_a(sk_pod: Any, base_image: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("on-a") / "layout"
    rc, data, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", base_image.oci, "--output", f"oci:{out}:v1")
    assert rc == 0, err
    return out, data


def test_rebase_keeps_every_modelpod_layer_and_equals_a_build_on_the_new_base(
        on_a: tuple[Path, dict[str, Any]], bases: Bases, sk_pod: Any, tmp_path: Path) -> None:
    layout, built = on_a
    sbom_file = tmp_path / "rebased.cdx.json"
    rc, rebased, err = cli(sk_pod.home, "rebase", f"oci:{layout}:v1", "--base", bases.b,
                           "--output", f"oci:{tmp_path / 'rebased'}:v1", "--sbom", str(sbom_file))
    assert rc == 0, err
    old = [layer for layer in built["layers"] if layer["role"] != "base"]
    new = [layer for layer in rebased["layers"] if layer["role"] != "base"]
    def key(layers: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return [(x["digest"], x["diff_id"], x["role"]) for x in layers]

    assert key(new) == key(old)
    assert [x["role"] for x in rebased["layers"]].count("base") == 2  # A's layer and the patch
    assert rebased["digest"] != built["digest"]

    # What building on B from scratch makes: the very same image.
    rc, direct, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", bases.b, "--output", f"oci:{tmp_path / 'direct'}")
    assert rc == 0, err
    assert direct["digest"] == rebased["digest"]

    # The SBOM's Debian part is the new base's; the Python part and the files are unchanged.
    doc = json.loads(sbom_file.read_bytes())
    rc, before, err = cli(sk_pod.home, "sbom", f"oci:{layout}:v1")
    assert rc == 0, err
    debs = {c["name"]: c["version"] for c in doc["components"] if c.get("purl", "").startswith("pkg:deb/")}
    assert debs.pop("modelpod-test-patch") == "1.0-1"
    assert debs == {c["name"]: c["version"] for c in before["components"] if c.get("purl", "").startswith("pkg:deb/")}

    def ours(d: dict[str, Any]) -> list[Any]:
        return sorted((c["name"], c.get("version"), c.get("hashes")) for c in d["components"]
                      if not c.get("purl", "").startswith("pkg:deb/"))

    assert ours(doc) == ours(before)
    assert doc["metadata"]["component"]["version"] == rebased["digest"]
    rc, attached, err = cli(sk_pod.home, "sbom", f"oci:{tmp_path / 'rebased'}:v1")
    assert rc == 0, err
    assert attached == doc


def test_rebase_refuses_another_python(on_a: tuple[Path, dict[str, Any]], bases: Bases, sk_pod: Any,
                                       tmp_path: Path) -> None:
    layout, _ = on_a
    rc, _, err = cli(sk_pod.home, "rebase", f"oci:{layout}:v1", "--base", bases.wrong_python,
                     "--output", f"oci:{tmp_path / 'x'}")
    assert rc == 2
    assert "cannot rebase" in err and "CPython 3.11" in err and "3.12" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    rc, _, err = cli(sk_pod.home, "rebase", f"oci:{bases.b.removeprefix('oci:')}", "--base", bases.b,
                     "--output", f"oci:{tmp_path / 'y'}")
    assert rc != 0 and "not built by modelpod" in err


def test_rebase_through_the_registry_mounts_and_sends_no_modelpod_layer(
        sk_pod: Any, oci_registry: Any, oci_registry_base: str, bases: Bases) -> None:
    src = oci_registry.repo("rebase/sk-lr:a")
    rc, built, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", oci_registry_base, "--push", src)
    assert rc == 0, err
    dest = oci_registry.repo("rebase-out/sk-lr:b")
    rc, rebased, err = cli(sk_pod.home, "rebase", src, "--base", bases.b, "--push", dest)
    assert rc == 0, err
    moved = rebased["outputs"]["transfers"]
    # Four modelpod layers mounted from the source repository, A's layer too; only B's patch and the config sent.
    assert moved["uploaded"] == 2, moved
    assert rebased["kept_layers"] == [x["digest"] for x in built["layers"] if x["role"] != "base"]
    rc, doc, err = cli(sk_pod.home, "sbom", dest)
    assert rc == 0, err
    assert any(c["name"] == "modelpod-test-patch" for c in doc["components"])


@pytest.mark.docker
def test_rebased_image_runs_under_docker_and_predicts(on_a: tuple[Path, dict[str, Any]], bases: Bases,
                                                       sk_pod: Any, kit: Kit, tmp_path: Path) -> None:
    layout, _ = on_a
    archive = tmp_path / "rebased.tar"
    tag = f"modelpod-sbom-test/sk-lr:{uuid.uuid4().hex[:12]}"
    rc, rebased, err = cli(sk_pod.home, "rebase", f"oci:{layout}:v1", "--base", bases.b,
                           "--output", f"docker-archive:{archive}", "--tag", tag)
    assert rc == 0, err
    assert f"Loaded image: {tag}" in kit.docker("load", "-i", str(archive))
    port = kit.free_port()
    cid = ""
    try:
        info = json.loads(kit.docker("image", "inspect", tag))[0]
        assert info["Id"] == rebased["config"]
        # What Docker itself saves (no OCI index, so no referrers): the SBOM is made from its layers.
        saved = tmp_path / "saved.tar"
        kit.docker("save", "-o", str(saved), tag)
        rc, doc, err = cli(sk_pod.home, "sbom", f"docker-archive:{saved}", "--generate")
        assert rc == 0, err
        assert any(c["name"] == "modelpod-test-patch" for c in doc["components"])
        assert any(c["name"].endswith("model.skops") and c["type"] == "file" for c in doc["components"])
        # The patch layer is there under the modelpod layers.
        assert kit.docker("run", "--rm", "--entrypoint", "/bin/cat", tag, "/etc/modelpod-test-patch") == "patched"
        cid = kit.docker("run", "-d", "--network", "host", "--read-only", "--name",
                         f"modelpod-sbom-{uuid.uuid4().hex[:10]}", tag, "--port", str(port))
        base = f"http://127.0.0.1:{port}"
        kit.wait_container(cid, lambda: kit.http_status(f"{base}/v2/health/ready") == 200, 90, "the container")
        spec = sk_pod.record.manifest.signature.inputs[0]
        sample = sk_pod.sample
        request = {"inputs": [{"name": spec.name, "shape": list(sample.shape), "datatype": spec.datatype,
                               "data": sample.ravel().tolist()}]}
        req = urllib.request.Request(f"{base}/v2/models/sk-lr/infer", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            served = json.loads(resp.read())
        (tmp_path / "req.json").write_text(json.dumps(request))
        rc, local, err = cli(sk_pod.home, "predict", "sk-lr:1", "--input", str(tmp_path / "req.json"))
        assert rc == 0, err
        assert [(o["name"], o["shape"], o["data"]) for o in served["outputs"]] == \
            [(o["name"], o["shape"], o["data"]) for o in local["outputs"]]
    finally:
        if cid:
            kit.docker("rm", "-f", cid, check=False)
        kit.docker("rmi", tag, check=False)

