"""OCI 1.1 referrers: artifacts (signatures, SBOMs) attached to a manifest by its ``subject``.

Facts relied on (image-spec and distribution-spec v1.1): a referrer is an image manifest with
``artifactType``, the empty config (``application/vnd.oci.empty.v1+json``, the two bytes ``{}``)
and a ``subject`` descriptor naming the manifest it is about. A registry with the referrers API
answers ``PUT`` of such a manifest with an ``OCI-Subject`` header and lists referrers at
``GET /v2/<name>/referrers/<digest>`` (an image index, filterable by ``artifactType``). A registry
without it (the CNCF distribution 2.x that Debian packages, say) keeps the manifest but ignores the
subject; then the client keeps the list itself, as an image index under the tag
``sha256-<hex of the subject digest>`` (the "referrers tag schema"), read back the same way.

Updating that index is read-modify-write: two clients attaching to the same subject at the same
moment can lose one entry (the spec's caveat); attaching again restores it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelpod.errors import ImageError, IntegrityError
from modelpod.image.oci import OCI_INDEX, OCI_MANIFEST, BlobStore, Descriptor, sha256_digest, to_json
from modelpod.image.registry import Registry, RegistryHTTPError

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for ``digest``: ``sha256-<hex>``."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"


@dataclass(frozen=True)
class Attached:
    """What ``attach`` pushed: the referrer's descriptor, and whether the registry's API took it."""

    descriptor: Descriptor
    api: bool  # True: the registry indexes referrers itself; False: the fallback tag was updated

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.descriptor.digest, "artifactType": self.descriptor.artifact_type,
                "referrers_api": self.api}


def attach(client: Registry, repo: str, subject: Descriptor, artifact_type: str,
           layers: Sequence[tuple[str, bytes]], blobs: BlobStore,
           annotations: Mapping[str, str] | None = None) -> Attached:
    """Push an artifact whose layers are ``(media_type, bytes)`` pairs as a referrer of ``subject``."""
    config = Descriptor(EMPTY_MEDIA_TYPE, blobs.put_bytes(EMPTY), len(EMPTY))
    descs = [config]
    for media_type, data in layers:
        descs.append(Descriptor(media_type, blobs.put_bytes(data), len(data)))
    for d in descs:
        client.push_blob(repo, d, blobs.path(d.digest), label=f"push {artifact_type.rsplit('/', 1)[-1]}")
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": config.to_dict(), "layers": [d.to_dict() for d in descs[1:]],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_dict(),
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    data = to_json(manifest)
    digest, answered = client.put_manifest_subject(repo, sha256_digest(data), data, OCI_MANIFEST)
    desc = Descriptor(OCI_MANIFEST, digest, len(data), dict(annotations or {}), artifact_type=artifact_type)
    if answered == subject.digest:
        return Attached(desc, True)
    _add_to_fallback(client, repo, subject.digest, desc)
    return Attached(desc, False)


def _fallback_index(client: Registry, repo: str, digest: str) -> dict[str, Any] | None:
    try:
        data, _ = client.get_manifest(repo, fallback_tag(digest))
    except RegistryHTTPError as exc:
        if exc.status == 404:
            return None
        raise
    try:
        index = json.loads(data)
    except ValueError:
        raise ImageError(f"{client.host}/{repo}:{fallback_tag(digest)}: the referrers index is not JSON") from None
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise ImageError(f"{client.host}/{repo}:{fallback_tag(digest)}: not an image index")
    return index


def _add_to_fallback(client: Registry, repo: str, subject: str, desc: Descriptor) -> None:
    index = _fallback_index(client, repo, subject) or {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    entries = [m for m in index.get("manifests") or () if isinstance(m, dict)]
    if any(m.get("digest") == desc.digest for m in entries):
        return
    index["manifests"] = [*entries, desc.to_dict()]
    client.put_manifest(repo, fallback_tag(subject), to_json(index), OCI_INDEX)


def referrers(client: Registry, repo: str, digest: str, artifact_type: str | None = None) -> list[Descriptor]:
    """The referrers of ``digest`` (through the API, else the fallback tag), optionally of one type."""
    body = client.get_referrers(repo, digest)
    if body is not None:
        try:
            index = json.loads(body)
        except ValueError:
            raise ImageError(f"{client.host}/{repo}: the referrers answer for {digest[:19]}… is not JSON") from None
    else:
        index = _fallback_index(client, repo, digest) or {}
    found = [Descriptor.from_dict(m) for m in index.get("manifests") or () if isinstance(m, dict)]
    if artifact_type is not None:
        found = [d for d in found if d.artifact_type == artifact_type]
    return found


def fetch(client: Registry, repo: str, referrer: Descriptor, subject: str,
          blobs: BlobStore) -> list[tuple[Descriptor, bytes]]:
    """The layers of one referrer, each checked against its digest; the referrer must name ``subject``."""
    data, _ = client.get_manifest(repo, referrer.digest)
    try:
        doc = json.loads(data)
        layers = [Descriptor.from_dict(d) for d in doc.get("layers") or ()]
        named = (doc.get("subject") or {}).get("digest")
    except (ValueError, AttributeError, TypeError):
        raise ImageError(f"{client.host}/{repo}@{referrer.digest[:19]}…: unreadable referrer manifest") from None
    if named != subject:
        raise IntegrityError(f"{client.host}/{repo}@{referrer.digest[:19]}…: the referrer is about {named}, "
                             f"not {subject}")
    return [(d, client.fetch_blob(repo, d, blobs).read_bytes()) for d in layers]
