"""Import must never write outside its destination: each defence has a test here."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from modelpod.archive import export, extract, import_archive
from modelpod.errors import IntegrityError, PodError, UnsafeArchiveError
from modelpod.packing import pack
from modelpod.store import Store


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("member", "data", "why"),
    [
        (_info("/etc/evil"), b"x", "absolute"),
        (_info("../evil"), b"x", "climbs"),
        (_info("a/../../evil"), b"x", "climbs"),
        (_info("link", tarfile.SYMTYPE, "/etc/passwd"), None, "link"),
        (_info("hard", tarfile.LNKTYPE, "/etc/passwd"), None, "link"),
        (_info("dev", tarfile.CHRTYPE), None, "device"),
        (_info("fifo", tarfile.FIFOTYPE), None, "FIFO"),
        (_info("a\\..\\b"), b"x", "forbidden"),
    ],
)
def test_unsafe_members_are_refused(tmp_path: Path, member: tarfile.TarInfo, data: bytes | None, why: str) -> None:
    archive = _tar(tmp_path / "a.tar", [(member, data)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match=why):
        extract(archive, dest)
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


def test_symlinked_directory_trick_is_refused(tmp_path: Path) -> None:
    # A directory entry, then a link with the same name, then a file through it.
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = _tar(tmp_path / "a.tar", [(_info("d", tarfile.SYMTYPE, str(outside)), None),
                                        (_info("d/x"), b"pwn")])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError):
        extract(archive, dest)
    assert list(outside.iterdir()) == []


def test_member_and_size_caps(tmp_path: Path) -> None:
    many = _tar(tmp_path / "many.tar", [(_info(f"f{i}"), b"x") for i in range(20)])
    (tmp_path / "d1").mkdir()
    with pytest.raises(UnsafeArchiveError, match="members"):
        extract(many, tmp_path / "d1", max_members=10)
    big = _tar(tmp_path / "big.tar", [(_info("f"), b"x" * 5000)])
    (tmp_path / "d2").mkdir()
    with pytest.raises(UnsafeArchiveError, match="bytes"):
        extract(big, tmp_path / "d2", max_bytes=1000)


def test_export_import_round_trip_is_deterministic(
    store: Store, tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, object]
) -> None:
    rec = pack(sklearn_model[0], "lr", store, sample=sklearn_model[1])
    a = export(store.open("lr:1"), tmp_path / "a.tar")
    b = export(store.open("lr:1"), tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    other = Store(tmp_path / "other")
    got = import_archive(a, other)
    assert (got.name, got.version, got.digest) == ("lr", 1, rec.digest)
    renamed = import_archive(a, other, name="lr2")
    assert renamed.name == "lr2"


def test_tampered_archive_is_refused_naming_the_file(
    store: Store, tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, object]
) -> None:
    pack(sklearn_model[0], "lr", store, sample=sklearn_model[1])
    good = export(store.open("lr:1"), tmp_path / "good.tar")
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith(".skops"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(m, io.BytesIO(data))
    other = Store(tmp_path / "other")
    with pytest.raises(IntegrityError, match=r"model/model\.skops"):
        import_archive(bad, other)
    assert other.list() == [] and list(other.tmp.iterdir()) == []


def test_files_not_in_manifest_are_refused(
    store: Store, tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, object]
) -> None:
    pack(sklearn_model[0], "lr", store, sample=sklearn_model[1])
    good = export(store.open("lr:1"), tmp_path / "good.tar")
    sneaky = tmp_path / "sneaky.tar"
    with tarfile.open(good) as src, tarfile.open(sneaky, "w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = _info("model/extra.py")
        info.size = 3
        dst.addfile(info, io.BytesIO(b"x=1"))
    with pytest.raises(UnsafeArchiveError, match="extra.py"):
        import_archive(sneaky, Store(tmp_path / "other"))


def test_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"hello")
    with pytest.raises(PodError, match="tar"):
        import_archive(tmp_path / "x.tar", Store(tmp_path / "home"))
