"""OCI records and local formats: media types, descriptors, a blob cache, image layouts, docker archives.

Facts relied on (image-spec v1.1): an image layout is ``oci-layout`` (``imageLayoutVersion``
1.0.0), ``index.json`` (an image index) and ``blobs/<alg>/<hex>``; a tag in a layout is the
``org.opencontainers.image.ref.name`` annotation of an index entry. Docker's schema2 media types
describe the same bytes as their OCI twins, so a layer's digest survives the renaming. ``docker
load`` reads ``manifest.json`` (Config, RepoTags, Layers paths) and accepts gzip or plain layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from modelpod.errors import ImageError, IntegrityError
from modelpod.image.tarball import Entry, FileSource, file_entry, write_layer
from modelpod.pod import canonical_json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
POD_ARTIFACT = "application/vnd.modelpod.pod.v1+json"
POD_CONFIG = "application/vnd.modelpod.pod.config.v1+json"
POD_LAYER = "application/vnd.modelpod.pod.layer.v1.tar"

MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
REF_NAME = "org.opencontainers.image.ref.name"
# Manifests, configs and index files use the one canonical JSON encoding, the pod digest's.
to_json = canonical_json

# Docker's layer types mapped onto the OCI equivalents: same bytes, so the same digests.
_TO_OCI_LAYER = {DOCKER_LAYER_GZIP: OCI_LAYER_GZIP, "application/vnd.docker.image.rootfs.diff.tar": OCI_LAYER}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_layer_type(media_type: str) -> str:
    """The OCI media type for a layer; refuses types we cannot unpack or re-describe."""
    if media_type in (OCI_LAYER, OCI_LAYER_GZIP):
        return media_type
    if media_type in _TO_OCI_LAYER:
        return _TO_OCI_LAYER[media_type]
    if media_type == DOCKER_FOREIGN or "nondistributable" in media_type:
        raise ImageError(f"base image has a foreign/non-distributable layer ({media_type}); not supported")
    raise ImageError(f"base image has a layer of unsupported type {media_type!r}")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, str] | None = None
    artifact_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Descriptor:
        try:
            digest = str(data["digest"])
            if not digest.startswith("sha256:") or len(digest) != 71:
                raise ImageError(f"unsupported digest {digest!r} (only sha256)")
            return cls(
                str(data.get("mediaType") or ""), digest, int(data["size"]),
                {str(k): str(v) for k, v in (data.get("annotations") or {}).items()},
                dict(data["platform"]) if data.get("platform") else None,
                data.get("artifactType"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"bad descriptor {dict(data)!r}: {exc}") from None


def pick_platform(index: Mapping[str, Any], os_: str = "linux", arch: str = "amd64") -> Descriptor:
    """The manifest for ``os_/arch`` in an image index or docker manifest list."""
    found = [Descriptor.from_dict(m) for m in index.get("manifests") or ()]
    for d in found:
        p = d.platform or {}
        if p.get("os") == os_ and p.get("architecture") == arch:
            return d
    have = sorted({f"{(d.platform or {}).get('os')}/{(d.platform or {}).get('architecture')}" for d in found})
    raise ImageError(f"the base image has no {os_}/{arch} variant (it has: {', '.join(have) or 'none'})")


class BlobStore:
    """Content-addressed blobs in ``root/sha256/<hex>``, written by rename so none is half-written."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        alg, _, hexpart = digest.partition(":")
        if alg != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
            raise ImageError(f"bad digest {digest!r}")
        return self.root / "sha256" / hexpart

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not self.has(digest):
            with self.writer() as fh:
                fh.write(data)
                fh.finish(digest)
        return digest

    @contextlib.contextmanager
    def writer(self) -> Iterator[_BlobWriter]:
        """A temporary file; ``finish(digest)`` renames it into place, anything else discards it."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        w = _BlobWriter(os.fdopen(fd, "wb"), Path(tmp), self)
        try:
            yield w
        finally:
            w.fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def verify(self, digest: str) -> None:
        h = hashlib.sha256()
        with self.path(digest).open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        if "sha256:" + h.hexdigest() != digest:
            self.path(digest).unlink()
            raise IntegrityError(f"blob {digest[:19]}… does not match its digest (removed from the cache)")


class _BlobWriter:
    def __init__(self, fh: IO[bytes], tmp: Path, store: BlobStore) -> None:
        self.fh, self.tmp, self.store = fh, tmp, store

    def write(self, data: bytes) -> int:
        return self.fh.write(data)

    def finish(self, digest: str) -> Path:
        self.fh.close()
        dest = self.store.path(digest)
        os.chmod(self.tmp, 0o444)
        os.replace(self.tmp, dest)
        return dest


@dataclass(frozen=True)
class Image:
    """A complete image in a BlobStore: manifest bytes, parsed config, layer descriptors."""

    manifest: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    artifact_type: str | None = None  # set for an artifact (a referrer: an SBOM, a signature)

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.manifest), dict(annotations or {}),
                          artifact_type=self.artifact_type)

    def blobs(self) -> list[Descriptor]:
        return [self.config, *self.layers]


def _place(src: Path, dest: Path) -> None:
    """Hard-link a cached blob into an output (copy across filesystems)."""
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".part")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def write_layout(directory: Path, image: Image, store: BlobStore, tag: str | None) -> Path:
    """Write (or add to) an OCI image layout; the manifest entry is tagged ``tag`` (None: untagged, as
    referrers are: found by their ``subject``)."""
    directory.mkdir(parents=True, exist_ok=True)
    index_path = directory / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if index_path.exists():
        index = read_json(index_path, "index.json")
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for d in image.blobs():
        _place(store.path(d.digest), blobs / d.digest.removeprefix("sha256:"))
    atomic_write(blobs / image.digest.removeprefix("sha256:"), image.manifest)
    if tag is None:
        kept = [m for m in index.get("manifests") or () if m.get("digest") != image.digest]
    else:
        kept = [m for m in index.get("manifests") or () if (m.get("annotations") or {}).get(REF_NAME) != tag]
    index["manifests"] = [*kept, image.descriptor({REF_NAME: tag} if tag is not None else None).to_dict()]
    atomic_write(directory / "oci-layout", to_json({"imageLayoutVersion": "1.0.0"}))
    # index.json last: a reader never sees a tag whose blobs are not all there.
    atomic_write(index_path, to_json(index))
    return directory


def read_layout(directory: Path, tag: str | None, os_: str = "linux", arch: str = "amd64") -> tuple[bytes, str]:
    """The manifest bytes and media type for ``tag`` (or the only manifest) in an OCI layout."""
    if not (directory / "oci-layout").is_file():
        raise ImageError(f"{directory}: not an OCI image layout (no oci-layout file)")
    index = read_json(directory / "index.json", f"{directory}/index.json")
    # Referrers (SBOMs, signatures) sit in the index too, untagged, with an artifactType: not images.
    entries = [d for d in (Descriptor.from_dict(m) for m in index.get("manifests") or ()) if not d.artifact_type]
    if tag is not None:
        entries = [d for d in entries if d.annotations.get(REF_NAME) == tag]
        if not entries:
            raise ImageError(f"{directory}: no image tagged {tag!r}")
    if len(entries) != 1:
        tags = sorted(d.annotations.get(REF_NAME, d.digest[:19]) for d in entries)
        raise ImageError(f"{directory}: holds {len(entries)} images ({', '.join(tags)}); name one as oci:DIR:TAG")
    desc = entries[0]
    data = _layout_blob(directory, desc.digest)
    if desc.media_type in INDEXES:
        desc = pick_platform(json.loads(data), os_, arch)
        data = _layout_blob(directory, desc.digest)
    return data, desc.media_type


def _layout_blob(directory: Path, digest: str) -> bytes:
    path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
    try:
        data = path.read_bytes()
    except OSError:
        raise ImageError(f"{directory}: blob {digest[:19]}… is missing") from None
    if sha256_digest(data) != digest:
        raise IntegrityError(f"{directory}: blob {digest[:19]}… does not match its digest")
    return data


def write_docker_archive(path: Path, image: Image, store: BlobStore, repo_tags: Sequence[str],
                         referrers: Sequence[Image] = ()) -> Path:
    """A tar ``docker load`` accepts; it is also an OCI layout inside, like ``docker save`` writes, whose
    index also lists ``referrers`` (artifacts about the image; ``docker load`` reads manifest.json only)."""
    manifest_json = [{
        "Config": f"blobs/sha256/{image.config.digest.removeprefix('sha256:')}",
        "RepoTags": list(repo_tags),
        "Layers": [f"blobs/sha256/{d.digest.removeprefix('sha256:')}" for d in image.layers],
    }]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [image.descriptor({REF_NAME: repo_tags[0]} if repo_tags else {}).to_dict(),
                           *(r.descriptor().to_dict() for r in referrers)]}
    entries: list[Entry] = [
        file_entry("manifest.json", to_json(manifest_json)),
        file_entry("index.json", to_json(index)),
        file_entry("oci-layout", to_json({"imageLayoutVersion": "1.0.0"})),
    ]
    blobs: dict[str, Entry] = {}
    for item in (image, *referrers):
        name = f"blobs/sha256/{item.digest.removeprefix('sha256:')}"
        blobs[name] = file_entry(name, item.manifest)
        for d in item.blobs():
            name = f"blobs/sha256/{d.digest.removeprefix('sha256:')}"
            blobs[name] = Entry(name, "file", 0o644, d.size, FileSource(store.path(d.digest)))
    entries += blobs.values()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as fh:
        write_layer(entries, fh, gzip_level=None)
    os.replace(tmp, path)
    return path


def read_docker_archive(path: Path, store: BlobStore) -> tuple[dict[str, Any], list[Descriptor]]:
    """Import a docker archive's config and layers into ``store``: (config, layer descriptors)."""
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"{path}: not a readable docker archive: {exc}") from None
    with tar:
        try:
            manifest = json.loads(_member(tar, "manifest.json", path))
            item = manifest[0]
            config_bytes = _member(tar, str(item["Config"]), path)
            layer_names = [str(n) for n in item["Layers"]]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ImageError(f"{path}: bad manifest.json: {exc}") from None
        store.put_bytes(config_bytes)
        layers: list[Descriptor] = []
        for name in layer_names:
            src = tar.extractfile(name)
            if src is None:
                raise ImageError(f"{path}: layer {name} is missing")
            layers.append(_import_layer(src, store))
    return json.loads(config_bytes), layers


def _member(tar: tarfile.TarFile, name: str, path: Path) -> bytes:
    try:
        src = tar.extractfile(name)
    except KeyError:
        src = None
    if src is None:
        raise ImageError(f"{path}: {name} is missing")
    return src.read()


def _import_layer(src: IO[bytes], store: BlobStore) -> Descriptor:
    h = hashlib.sha256()
    size = 0
    head = b""
    with store.writer() as w:
        while block := src.read(1 << 20):
            if not head:
                head = block[:4]
            h.update(block)
            size += len(block)
            w.write(block)
        digest = "sha256:" + h.hexdigest()
        w.finish(digest)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        media = OCI_LAYER_ZSTD
    else:
        media = OCI_LAYER_GZIP if head.startswith(b"\x1f\x8b") else OCI_LAYER
    return Descriptor(media, digest, size)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImageError(f"{what}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what}: expected a JSON object")
    return data


def atomic_write(path: Path, data: bytes) -> None:
    """Write by rename, under a unique temporary name, so concurrent writers never mix bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
