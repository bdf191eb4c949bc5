"""CPython is found by reading the base's layers: links, whiteouts, versions, libc."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelpod.errors import ImageError
from modelpod.image.base import BaseImage, find_python
from modelpod.image.oci import OCI_LAYER_GZIP, BlobStore, Descriptor
from modelpod.image.tarball import Entry, file_entry, write_layer

GLIBC = b"\x00GNU C Library (Debian GLIBC 2.36-9+deb12u10) stable release version 2.36.\n\x00"


def _base(store: BlobStore, *layers: list[Entry], arch: str = "amd64") -> BaseImage:
    descs, diff_ids = [], []
    for entries in layers:
        with store.writer() as w:
            got = write_layer(entries, w)
            w.finish(got.digest)
        descs.append(Descriptor(OCI_LAYER_GZIP, got.digest, got.size))
        diff_ids.append(got.diff_id)
    config = {"os": "linux", "architecture": arch, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    return BaseImage("test-base", None, None, config, tuple(descs))


def _link(path: str, target: str) -> Entry:
    return Entry(path, "symlink", 0o777, linkname=target)


def test_debian_python_through_the_python3_link(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    base = _base(store, [file_entry("usr/bin/python3.11", b"ELF", True), _link("usr/bin/python3", "python3.11"),
                         file_entry("usr/lib/x86_64-linux-gnu/libc.so.6", GLIBC)])
    py = find_python(base, store, "3.11")
    assert (py.path, py.version, py.glibc, py.machine) == ("/usr/bin/python3.11", "3.11", (2, 36), "x86_64")


def test_python_image_layout_prefers_usr_local(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    base = _base(store, [file_entry("usr/bin/python3.11", b"ELF", True)],
                 [file_entry("usr/local/bin/python3.11", b"ELF", True),
                  _link("usr/local/bin/python3", "/usr/local/bin/python3.11")], arch="arm64")
    py = find_python(base, store, "3.11")
    assert py.path == "/usr/local/bin/python3.11" and py.machine == "aarch64" and py.glibc is None


def test_mismatch_names_what_the_base_has(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    base = _base(store, [file_entry("usr/local/bin/python3.12", b"ELF", True)])
    want = r"has Python 3\.12 \(/usr/local/bin/python3\.12\); the pod needs Python 3\.11"
    with pytest.raises(ImageError, match=want):
        find_python(base, store, "3.11")


def test_whiteouts_remove_an_interpreter(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    base = _base(store, [file_entry("usr/bin/python3.11", b"ELF", True)],
                 [file_entry("usr/bin/.wh.python3.11", b"")])
    with pytest.raises(ImageError, match="no CPython"):
        find_python(base, store, "3.11")
    opaque = _base(store, [file_entry("usr/local/bin/python3.11", b"ELF", True)],
                   [file_entry("usr/local/bin/.wh..wh..opq", b""), file_entry("usr/bin/python3.11", b"ELF", True)])
    assert find_python(opaque, store, "3.11").path == "/usr/bin/python3.11"


def test_musl_bases_are_refused_clearly(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    base = _base(store, [file_entry("lib/ld-musl-x86_64.so.1", b"ELF"), file_entry("usr/local/bin/python3.11", b"E")])
    with pytest.raises(ImageError, match="musl"):
        find_python(base, store, "3.11")


def test_scan_results_are_cached_per_layer_set(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    base = _base(store, [file_entry("usr/bin/python3.11", b"ELF", True)])
    find_python(base, store, "3.11", tmp_path / "scans")
    assert len(list((tmp_path / "scans").glob("*.json"))) == 1
    for d in base.layers:  # the layers are not read again
        store.path(d.digest).chmod(0o644)
        store.path(d.digest).unlink()
    assert find_python(base, store, "3.11", tmp_path / "scans").path == "/usr/bin/python3.11"
