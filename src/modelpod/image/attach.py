"""Artifacts about an image (its SBOM, its signatures) beside it: OCI 1.1 referrers in a registry, and
untagged index entries in an OCI layout or in the layout inside a docker archive.

An artifact is an image manifest with ``artifactType``, the empty config and a ``subject`` naming
the image manifest; in a layout it is found by scanning ``index.json`` for entries with an
``artifactType`` whose manifest names the image as its subject (the same records a registry's
referrers API lists). In a registry, ``referrers.attach`` pushes them (with the fallback tag for
registries without the referrers API).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpod.errors import ImageError, IntegrityError
from modelpod.image import referrers
from modelpod.image.oci import (
    OCI_MANIFEST,
    REF_NAME,
    BlobStore,
    Descriptor,
    Image,
    read_json,
    sha256_digest,
    to_json,
    write_layout,
)
from modelpod.image.referrers import EMPTY, EMPTY_MEDIA_TYPE, Attached
from modelpod.image.registry import Registry

SBOM_TYPE = "application/vnd.cyclonedx+json"
TITLE = "org.opencontainers.image.title"


class NoIndexError(ImageError):
    """A docker archive with no OCI index: no manifest digest, so no referrers."""


@dataclass(frozen=True)
class Payload:
    """One artifact to attach: its type, its one layer's bytes, a file name for it."""

    artifact_type: str
    data: bytes
    title: str
    annotations: Mapping[str, str] | None = None


def artifact(subject: Descriptor, payload: Payload, blobs: BlobStore) -> Image:
    """The referrer manifest of ``payload`` about ``subject``; its blobs are put in ``blobs``."""
    config = Descriptor(EMPTY_MEDIA_TYPE, blobs.put_bytes(EMPTY), len(EMPTY))
    layer = Descriptor(payload.artifact_type, blobs.put_bytes(payload.data), len(payload.data),
                       {TITLE: payload.title})
    doc: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": payload.artifact_type,
        "config": config.to_dict(), "layers": [layer.to_dict()],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_dict(),
    }
    if payload.annotations:
        doc["annotations"] = dict(payload.annotations)
    return Image(to_json(doc), OCI_MANIFEST, config, (layer,), artifact_type=payload.artifact_type)


def to_layout(directory: Path, subject: Descriptor, payloads: Sequence[Payload], blobs: BlobStore) -> list[str]:
    """Add ``payloads`` to a layout already holding the image; their manifest digests."""
    out = []
    for p in payloads:
        made = artifact(subject, p, blobs)
        write_layout(directory, made, blobs, None)
        out.append(made.digest)
    return out


def to_registry(client: Registry, repo: str, subject: Descriptor, payloads: Sequence[Payload],
                blobs: BlobStore) -> list[Attached]:
    return [referrers.attach(client, repo, subject, p.artifact_type, [(p.artifact_type, p.data)], blobs,
                             annotations=p.annotations) for p in payloads]


# -- reading -------------------------------------------------------------------------------------
class _Layout:
    """Blobs and the index of an OCI layout, a directory or the one inside a docker archive."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.tar: tarfile.TarFile | None = None
        self.dir: Path | None = None
        if spec.startswith("docker-archive:"):
            path = Path(spec.removeprefix("docker-archive:"))
            try:
                self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
            except (OSError, tarfile.TarError) as exc:
                raise ImageError(f"{path}: not a readable docker archive: {exc}") from None
        else:
            from modelpod.image.base import _split_layout

            self.dir, self.tag = _split_layout(spec.removeprefix("oci:"))
        if self.dir is None:
            self.tag = None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def index(self) -> dict[str, Any]:
        if self.dir is not None:
            return read_json(self.dir / "index.json", f"{self.dir}/index.json")
        try:
            data = self._member("index.json")
        except ImageError:
            return {"manifests": []}  # a `docker save` archive of an older docker: no OCI index
        try:
            doc: dict[str, Any] = json.loads(data)
        except ValueError:
            raise ImageError(f"{self.spec}: index.json is not JSON") from None
        return doc

    def blob(self, digest: str) -> bytes:
        name = f"blobs/sha256/{digest.removeprefix('sha256:')}"
        data = (self.dir / name).read_bytes() if self.dir is not None and (self.dir / name).is_file() \
            else self._member(name) if self.tar is not None else None
        if data is None:
            raise ImageError(f"{self.spec}: blob {digest[:19]}… is missing")
        if sha256_digest(data) != digest:
            raise IntegrityError(f"{self.spec}: blob {digest[:19]}… does not match its digest")
        return data

    def _member(self, name: str) -> bytes:
        assert self.tar is not None
        try:
            fh = self.tar.extractfile(name)
        except KeyError:
            fh = None
        if fh is None:
            raise ImageError(f"{self.spec}: {name} is missing")
        return fh.read()


def subject_of(spec: str, registry: Any = None) -> tuple[Descriptor, Any]:
    """The image manifest's descriptor named by ``spec`` and a handle to read its referrers with."""
    if spec.startswith(("oci:", "docker-archive:")):
        layout = _Layout(spec)
        entries = [Descriptor.from_dict(m) for m in layout.index().get("manifests") or ()]
        images = [d for d in entries if not d.artifact_type]
        if layout.tag is not None:
            images = [d for d in images if d.annotations.get(REF_NAME) == layout.tag]
        if not images and layout.tar is not None and layout.tag is None:
            layout.close()
            raise NoIndexError(f"{spec}: an archive without an OCI index (docker save): nothing can be attached "
                               f"to it; `modelpod sbom {spec} --generate` makes the SBOM from its layers")
        if len(images) != 1:
            layout.close()
            what = "no image" if not images else f"{len(images)} images"
            raise ImageError(f"{spec}: holds {what}{' tagged ' + layout.tag if layout.tag else ''}"
                             f"{'; name one as oci:DIR:TAG' if len(images) > 1 else ''}")
        return Descriptor(images[0].media_type, images[0].digest, images[0].size), layout
    from modelpod.image.registry import Reference

    ref = Reference.parse(spec.removeprefix("docker://"))
    client: Registry = registry(ref.host)
    data, media = client.get_manifest(ref.repository, ref.reference)
    return Descriptor(media, sha256_digest(data), len(data)), (client, ref)


def find(spec: str, artifact_type: str, registry: Any, blobs: BlobStore) -> tuple[Descriptor, list[bytes]]:
    """The subject's descriptor and the payloads of its referrers of ``artifact_type``, newest last."""
    subject, handle = subject_of(spec, registry)
    if isinstance(handle, _Layout):
        try:
            return subject, _from_layout(handle, subject.digest, artifact_type)
        finally:
            handle.close()
    client, ref = handle
    out = []
    for d in referrers.referrers(client, ref.repository, subject.digest, artifact_type):
        for layer, data in referrers.fetch(client, ref.repository, d, subject.digest, blobs):
            if layer.media_type == artifact_type:
                out.append(data)
    return subject, out


def _from_layout(layout: _Layout, subject: str, artifact_type: str) -> list[bytes]:
    out = []
    for m in layout.index().get("manifests") or ():
        d = Descriptor.from_dict(m)
        if d.artifact_type != artifact_type:
            continue
        try:
            doc = json.loads(layout.blob(d.digest))
        except ValueError:
            raise ImageError(f"{layout.spec}: referrer {d.digest[:19]}… is not JSON") from None
        if (doc.get("subject") or {}).get("digest") != subject:
            continue
        for layer in doc.get("layers") or ():
            ld = Descriptor.from_dict(layer)
            if ld.media_type == artifact_type:
                out.append(layout.blob(ld.digest))
    return out
