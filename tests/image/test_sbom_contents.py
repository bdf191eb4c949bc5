"""The SBOM's inputs read from real layer tars (made here), and the CycloneDX document made of them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from modelpod.image.contents import license_of, parse_dpkg_status, parse_os_release, scan, scan_cached
from modelpod.image.oci import OCI_LAYER_GZIP, BlobStore, Descriptor
from modelpod.image.sbom import make_sbom, summary, validate
from modelpod.image.tarball import Entry, file_entry, write_layer

STATUS = b"""Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u7
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Description: GNU C Library: Shared libraries
 Contains the standard libraries.

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: python3.11-minimal
Status: install ok installed
Architecture: amd64
Source: python3.11
Version: 3.11.2-6+deb12u2
Homepage: https://www.python.org/
"""


def _layer(store: BlobStore, entries: list[Entry]) -> Descriptor:
    with store.writer() as w:
        got = write_layer(entries, w)
        w.finish(got.digest)
    return Descriptor(OCI_LAYER_GZIP, got.digest, got.size)


def _dist(site: str, name: str, version: str, meta: str = "") -> list[Entry]:
    info = f"opt/modelpod/{site}/{name}-{version}.dist-info"
    return [file_entry(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}".encode()),
            file_entry(f"{info}/WHEEL", b"Wheel-Version: 1.0\nTag: py3-none-any\n"),
            file_entry(f"{info}/RECORD", f"{name}/__init__.py,sha256=x,1\n".encode()),
            file_entry(f"opt/modelpod/{site}/{name}/__init__.py", b"\n")]


def test_dpkg_status_lists_installed_packages_only() -> None:
    got = parse_dpkg_status(STATUS)
    assert [(p.name, p.version, p.architecture, p.source) for p in got] == [
        ("libc6", "2.36-9+deb12u7", "amd64", "glibc"),
        ("python3.11-minimal", "3.11.2-6+deb12u2", "amd64", "python3.11")]


def test_os_release_and_licenses() -> None:
    assert parse_os_release(b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n') == \
        {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "ID": "debian", "VERSION_ID": "12"}
    assert license_of("MIT OR Apache-2.0", "ignored", []) == "MIT OR Apache-2.0"
    assert license_of(None, "BSD-3-Clause", []) == "BSD-3-Clause"
    assert license_of(None, "long\ntext", ["License :: OSI Approved :: MIT License"]) == "MIT License"
    assert license_of(None, None, []) is None


def test_scan_reads_layers_and_the_sbom_validates(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    # Base: dpkg status and os-release (a link, as Debian ships it); a second base layer deletes nothing we need.
    base = [
        _layer(store, [file_entry("var/lib/dpkg/status", STATUS),
                       file_entry("usr/lib/os-release", b'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian 12"\n'),
                       Entry("etc/os-release", "symlink", 0o777, linkname="../usr/lib/os-release")]),
        _layer(store, [file_entry("etc/hostname", b"x\n")]),
    ]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "tinylib-1.2-py3-none-any.whl"
    wheel.write_bytes(b"not really a zip, only hashed")
    weights = b"\x00\x01" * 1000
    manifest = ("schema: modelpod/v1\nname: m\nframework: sklearn\npython: '3.11'\nfiles:\n"
                f"- {{path: model.skops, sha256: {hashlib.sha256(weights).hexdigest()}, size: {len(weights)}, "
                "role: weights}\n")
    ours = [
        _layer(store, [*_dist("runtime", "tinylib", "1.2", "License-Expression: MIT\n"),
                       *_dist("runtime", "other", "3.0", "Classifier: License :: OSI Approved :: BSD License\n")]),
        _layer(store, _dist("deps", "tinylib", "2.0")),
        _layer(store, [file_entry("opt/modelpod/pod/model.skops", weights)]),
        _layer(store, [file_entry("opt/modelpod/pod/modelpod.yaml", manifest.encode())]),
    ]
    got = scan(store, base, ours, wheels)
    assert [(d.name, d.version, d.site, d.license) for d in got.python] == [
        ("tinylib", "2.0", "/opt/modelpod/deps", None),
        ("other", "3.0", "/opt/modelpod/runtime", "BSD License"),
        ("tinylib", "1.2", "/opt/modelpod/runtime", "MIT")]
    runtime_lib = got.python[2]
    assert runtime_lib.wheel == wheel.name
    assert runtime_lib.wheel_sha256 == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert got.python[0].wheel is None and got.python[0].record_sha256  # no wheel of 2.0 cached: RECORD's hash
    assert [p.name for p in got.debian] == ["libc6", "python3.11-minimal"]
    assert got.os_release["VERSION_ID"] == "12"
    files = {f.path: f for f in got.pod_files}
    assert files["model.skops"].sha256 == hashlib.sha256(weights).hexdigest()
    assert files["model.skops"].role == "weights" and files["modelpod.yaml"].role == "manifest"

    # Remembered by layer digests: the same answer again with the layers gone from the store.
    remembered = scan_cached(store, base, ours, wheels, tmp_path / "sbom")
    for d in [*base, *ours]:
        store.path(d.digest).unlink()
    assert scan_cached(store, base, ours, wheels, tmp_path / "sbom") == remembered
    assert remembered.python == got.python and remembered.pod_files == got.pod_files
    assert remembered.debian == got.debian and remembered.manifest == got.manifest

    data = make_sbom(got, image_digest="sha256:" + "ab" * 32, name="m", created=1_700_000_000)
    assert validate(data) is None
    doc = json.loads(data)
    assert doc["specVersion"] == "1.6"
    assert data == make_sbom(got, image_digest="sha256:" + "ab" * 32, name="m", created=1_700_000_000)
    purls = {c.get("purl") for c in doc["components"]}
    assert {"pkg:pypi/tinylib@1.2", "pkg:pypi/tinylib@2.0", "pkg:pypi/other@3.0"} <= purls
    assert "pkg:deb/debian/libc6@2.36-9%2Bdeb12u7?arch=amd64&distro=debian-12" in purls
    info = summary(doc)
    assert info["python_packages"] == 3 and info["python_by_layer"] == {"runtime": 2, "deps": 1}
    assert info["debian_packages"] == 2 and info["os"] == "debian 12"
    assert {f["path"]: f["sha256"] for f in info["files"]}["model.skops"] == hashlib.sha256(weights).hexdigest()


def test_validate_reports_a_broken_document() -> None:
    assert validate(b'{"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [{"name": 3}]}')
    assert validate(b"{not json")


@pytest.mark.parametrize("status", [b"", b"\n\n", b"Package: x\n"])
def test_odd_status_files_give_no_packages(status: bytes) -> None:
    assert parse_dpkg_status(status) == []
