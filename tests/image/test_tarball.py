"""Layer tars are deterministic: the same files give the same digests whatever the disk says."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

from modelpod.image.tarball import Entry, file_entry, normalise, tree_entries, write_layer


def _tree(root: Path, mtime: int, mode: int) -> Path:
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\x00stale")
    (root / "pkg" / "mod.pyc").write_bytes(b"\x00stale")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o700)
    (root / "data.bin").write_bytes(bytes(range(256)) * 10)
    (root / "data.bin").chmod(mode)
    for p in root.rglob("*"):
        os.utime(p, (mtime, mtime))
    return root


def _layer(entries: list[Entry], **kw: object) -> tuple[bytes, str, str]:
    buf = io.BytesIO()
    got = write_layer(entries, buf, **kw)  # type: ignore[arg-type]
    return buf.getvalue(), got.digest, got.diff_id


def test_same_content_gives_the_same_digest_whatever_mtimes_and_modes(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", 1_000_000, 0o600)
    b = _tree(tmp_path / "b", 2_000_000, 0o664)
    da = _layer(tree_entries(a, "opt/x"))
    db = _layer(tree_entries(b, "opt/x"))
    assert da == db


def test_members_are_sorted_rooted_and_anonymous(tmp_path: Path) -> None:
    data, _, _ = _layer(tree_entries(_tree(tmp_path / "t", 5, 0o600), "opt/x"), mtime=0)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == ["opt", "opt/x", "opt/x/data.bin", "opt/x/pkg", "opt/x/pkg/__init__.py", "opt/x/run.sh"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() or m.name.endswith("run.sh") else 0o644)


def test_gzip_header_has_no_time_and_no_name(tmp_path: Path) -> None:
    data, digest, diff_id = _layer([file_entry("a.txt", b"hello")])
    assert data[:3] == b"\x1f\x8b\x08"
    assert data[3] == 0  # no FNAME, no FEXTRA, no comment
    assert data[4:8] == b"\x00\x00\x00\x00"  # mtime 0
    raw = gzip.decompress(data)
    import hashlib

    assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def test_uncompressed_layer_digest_is_its_diff_id() -> None:
    _, digest, diff_id = _layer([file_entry("a.txt", b"hello")], gzip_level=None)
    assert digest == diff_id


def test_source_date_epoch_is_the_only_time(tmp_path: Path) -> None:
    _, one, _ = _layer([file_entry("a.txt", b"x")], mtime=1_700_000_000)
    _, two, _ = _layer([file_entry("a.txt", b"x")], mtime=1_700_000_000)
    _, other, _ = _layer([file_entry("a.txt", b"x")], mtime=0)
    assert one == two != other


def test_root_filesystems_keep_modes_owners_links(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3.11").write_bytes(b"ELF")
    (root / "usr" / "bin" / "python3.11").chmod(0o4755)
    (root / "usr" / "bin" / "python3").symlink_to("python3.11")
    os.link(root / "usr" / "bin" / "python3.11", root / "usr" / "bin" / "zz-hardlink")
    data, _, _ = _layer(tree_entries(root, keep_metadata=True))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        by_name = {m.name: m for m in tar.getmembers()}
    assert by_name["usr/bin/python3"].issym() and by_name["usr/bin/python3"].linkname == "python3.11"
    assert by_name["usr/bin/python3.11"].mode == 0o4755
    link = by_name["usr/bin/zz-hardlink"]
    assert link.islnk() and link.linkname == "usr/bin/python3.11"


def test_normalise_adds_parents_and_later_duplicates_win() -> None:
    out = normalise([file_entry("a/b/c.txt", b"1"), file_entry("a/b/c.txt", b"2"), file_entry("a-b", b"")])
    assert [e.path for e in out] == ["a", "a/b", "a/b/c.txt", "a-b"]
    assert out[2].size == 1 and out[2].source is not None
    with out[2].source.open() as fh:
        assert fh.read() == b"2"
