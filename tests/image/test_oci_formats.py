"""OCI layouts and docker archives: written, read back, refused when wrong."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from modelpod.errors import ImageError
from modelpod.image.base import load_base
from modelpod.image.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BlobStore,
    Descriptor,
    Image,
    pick_platform,
    read_docker_archive,
    read_layout,
    to_json,
    write_docker_archive,
    write_layout,
)
from modelpod.image.registry import Registry
from modelpod.image.tarball import file_entry, write_layer


def _image(store: BlobStore, content: bytes = b"hi") -> Image:
    with store.writer() as w:
        got = write_layer([file_entry("usr/bin/python3.11", content)], w)
        w.finish(got.digest)
    config = to_json({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [got.diff_id]},
                      "config": {"Env": ["PATH=/usr/bin"]}})
    config_desc = Descriptor(OCI_CONFIG, store.put_bytes(config), len(config))
    layer = Descriptor(OCI_LAYER_GZIP, got.digest, got.size)
    manifest = to_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_dict(),
                        "layers": [layer.to_dict()]})
    return Image(manifest, OCI_MANIFEST, config_desc, (layer,))


def test_layout_round_trip_by_tag(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    one, two = _image(store, b"one"), _image(store, b"two")
    write_layout(tmp_path / "lay", one, store, "one")
    write_layout(tmp_path / "lay", two, store, "two")
    assert json.loads((tmp_path / "lay" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert read_layout(tmp_path / "lay", "two") == (two.manifest, OCI_MANIFEST)
    with pytest.raises(ImageError, match="holds 2 images"):
        read_layout(tmp_path / "lay", None)
    write_layout(tmp_path / "lay", _image(store, b"three"), store, "two")  # retagging replaces
    index = json.loads((tmp_path / "lay" / "index.json").read_text())
    assert index["mediaType"] == OCI_INDEX and len(index["manifests"]) == 2


def test_base_from_layout_and_archive_have_the_same_layers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    image = _image(store)
    write_layout(tmp_path / "lay", image, store, "t")
    write_docker_archive(tmp_path / "img.tar", image, store, ["x/y:t"])
    cache = BlobStore(tmp_path / "cache")
    from_layout = load_base(f"oci:{tmp_path / 'lay'}:t", cache, Registry)
    from_archive = load_base(f"docker-archive:{tmp_path / 'img.tar'}", BlobStore(tmp_path / "c2"), Registry)
    assert from_layout.layers == from_archive.layers == image.layers
    assert from_layout.digest == image.digest and from_archive.digest is None


def test_docker_archive_has_what_docker_load_reads(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    image = _image(store)
    write_docker_archive(tmp_path / "img.tar", image, store, ["x/y:t"])
    with tarfile.open(tmp_path / "img.tar") as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        names = set(tar.getnames())
    assert manifest[0]["RepoTags"] == ["x/y:t"]
    assert manifest[0]["Config"] in names and all(layer in names for layer in manifest[0]["Layers"])
    config, layers = read_docker_archive(tmp_path / "img.tar", BlobStore(tmp_path / "again"))
    assert [d.digest for d in layers] == [d.digest for d in image.layers]


def test_uncompressed_docker_save_layers_are_recognised(tmp_path: Path) -> None:
    layer = io.BytesIO()
    got = write_layer([file_entry("a", b"a")], layer, gzip_level=None)
    config = to_json({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": [got.diff_id]}})
    with tarfile.open(tmp_path / "saved.tar", "w") as tar:
        for name, data in (("manifest.json", to_json([{"Config": "c.json", "Layers": ["abc/layer.tar"]}])),
                           ("c.json", config), ("abc/layer.tar", layer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    base = load_base(f"docker-archive:{tmp_path / 'saved.tar'}", BlobStore(tmp_path / "c"), Registry)
    assert base.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar"
    assert base.layers[0].digest == got.diff_id


def test_index_picks_linux_amd64_or_says_what_there_is() -> None:
    digest = "sha256:" + "a" * 64
    index = {"manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    assert pick_platform(index).digest == digest
    with pytest.raises(ImageError, match="linux/amd64, linux/arm64"):
        pick_platform(index, arch="s390x")


def test_blob_store_refuses_bad_digests_and_tampering(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(ImageError):
        store.path("sha256:../../etc/passwd")
    digest = store.put_bytes(b"data")
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"evil")
    from modelpod.errors import IntegrityError

    with pytest.raises(IntegrityError):
        store.verify(digest)
    assert not store.has(digest)


def test_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an OCI image layout"):
        load_base(f"oci:{tmp_path}", BlobStore(tmp_path / "c"), Registry)
