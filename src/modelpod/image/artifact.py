"""Pods as OCI artifacts: an OCI registry used as a remote store.

An artifact manifest (image-spec v1.1) with ``artifactType`` ``application/vnd.modelpod.pod.v1+json``;
its config blob is the pod's canonical manifest JSON, so the config digest *is* the pod digest;
layers are deterministic tars of file groups (each large weights/data file alone, the other
weights/data together, the rest together). Pull checks every blob's digest on arrival, the config
against the pod digest, every file against the manifest, and only then adds the pod to the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpod.archive import extract
from modelpod.errors import BadSignatureError, ImageError, IntegrityError, NotFoundError, PodError, UnsafeArchiveError
from modelpod.image.oci import (
    OCI_MANIFEST,
    POD_ARTIFACT,
    POD_CONFIG,
    POD_LAYER,
    BlobStore,
    Descriptor,
    atomic_write,
    sha256_digest,
    to_json,
)
from modelpod.image.plan import WEIGHTS_LAYER_BYTES
from modelpod.image.referrers import attach, fetch, referrers
from modelpod.image.registry import Reference, Registry, Transfers
from modelpod.image.tarball import Entry, FileSource, write_layer
from modelpod.pod import MANIFEST_NAME, FileEntry, Manifest, Pod, write_manifest
from modelpod.store import PodRecord, Store
from modelpod.trust.policy import TrustPolicy, add_signatures, parse_signatures, read_signatures

# A pod's (or image's) signature bundle (modelpod.trust.signing), as an OCI referrer's artifactType.
SIGNATURE_ARTIFACT = "application/vnd.modelpod.signature.v1+json"

TITLE = "org.opencontainers.image.title"


@dataclass(frozen=True)
class Pushed:
    reference: str
    digest: str  # the artifact manifest's digest
    tags: tuple[str, ...]
    transfers: Transfers
    signatures: int = 0  # attached as referrers

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest, "tags": list(self.tags),
                "transfers": self.transfers.to_dict(), "signatures": self.signatures}


def file_groups(files: Sequence[FileEntry], threshold: int = WEIGHTS_LAYER_BYTES) -> list[tuple[str, list[FileEntry]]]:
    """(title, files) per layer: large weights/data alone, small weights/data together, the rest together."""
    heavy = sorted((f for f in files if f.role in ("weights", "data")), key=lambda f: f.path)
    groups = [(f.path, [f]) for f in heavy if f.size >= threshold]
    small = [f for f in heavy if f.size < threshold]
    rest = sorted((f for f in files if f.role not in ("weights", "data")), key=lambda f: f.path)
    if small:
        groups.append(("weights", small))
    if rest:
        groups.append(("files", rest))
    return groups


def artifact(pod: Pod, blobs: BlobStore, version: int | None = None,
             threshold: int = WEIGHTS_LAYER_BYTES) -> tuple[bytes, list[Descriptor]]:
    """The artifact manifest for ``pod`` and its blobs (config first), written into ``blobs``."""
    config = pod.manifest.canonical_bytes()
    config_desc = Descriptor(POD_CONFIG, blobs.put_bytes(config), len(config))
    layers = [_layer(pod, title, files, blobs) for title, files in file_groups(pod.manifest.files, threshold)]
    annotations = {"dev.modelpod.name": pod.name, "dev.modelpod.digest": pod.digest,
                   "dev.modelpod.framework": pod.manifest.framework, TITLE: pod.name}
    if version is not None:
        annotations["org.opencontainers.image.version"] = str(version)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": POD_ARTIFACT,
                "config": config_desc.to_dict(), "layers": [d.to_dict() for d in layers],
                "annotations": annotations}
    return to_json(manifest), [config_desc, *layers]


def _layer(pod: Pod, title: str, files: Sequence[FileEntry], blobs: BlobStore) -> Descriptor:
    """One file group as an uncompressed tar (weights rarely compress); cached by content, so a
    re-push of the same pod reads no file again."""
    key = hashlib.sha256(to_json(["pod-layer-v1", [(f.path, f.sha256, f.size) for f in files]])).hexdigest()
    record = blobs.root.parent / "layers" / f"{key}.json"
    if record.is_file():
        known = json.loads(record.read_text())
        if blobs.has(known["digest"]):
            return Descriptor(POD_LAYER, known["digest"], known["size"], {TITLE: title})
    entries = [Entry(f.path, "file", 0o644, f.size, FileSource(pod.path / f.path)) for f in files]
    with blobs.writer() as w:
        got = write_layer(entries, w, gzip_level=None)
        w.finish(got.digest)
    atomic_write(record, to_json({"digest": got.digest, "size": got.size}))
    return Descriptor(POD_LAYER, got.digest, got.size, {TITLE: title})


def push_pod(pod: Pod, version: int | None, target: Reference, client: Registry, blobs: BlobStore) -> Pushed:
    """Push the pod; tags: the target's tag, else the pod version and ``latest``. Manifests go last."""
    manifest, descriptors = artifact(pod, blobs, version)
    for d in descriptors:
        client.push_blob(target.repository, d, blobs.path(d.digest), label=f"push {d.annotations.get(TITLE, 'config')}")
    tags = (target.tag,) if target.tag else tuple(t for t in (str(version) if version else None, "latest") if t)
    for tag in tags:
        client.put_manifest(target.repository, tag, manifest, OCI_MANIFEST)
    # The pod's signatures travel as OCI referrers of the artifact manifest, one per signature.
    subject = Descriptor(OCI_MANIFEST, sha256_digest(manifest), len(manifest))
    signatures = read_signatures(pod.path)
    for bundle in signatures:
        attach(client, target.repository, subject, SIGNATURE_ARTIFACT, [(SIGNATURE_ARTIFACT, bundle)], blobs,
               {"dev.modelpod.digest": pod.digest})
    return Pushed(str(target.with_tag(tags[0])), sha256_digest(manifest), tags, client.transfers, len(signatures))


def pull_pod(source: Reference, client: Registry, store: Store, policy: TrustPolicy | None = None) -> PodRecord:
    """Fetch, verify and add a pod to ``store``; the same digest already there is returned as is.

    The pod's signatures (referrers of its artifact manifest) come along; ``policy`` refuses the
    pod before any of it reaches the store."""
    data, media = client.get_manifest(source.repository, source.reference)
    try:
        doc = json.loads(data)
        config = Descriptor.from_dict(doc["config"])
        layers = [Descriptor.from_dict(d) for d in doc.get("layers") or ()]
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"{source}: not a modelpod pod (unreadable manifest)") from None
    if config.media_type != POD_CONFIG or any(d.media_type != POD_LAYER for d in layers):
        kind = doc.get("artifactType") or config.media_type
        raise ImageError(f"{source}: not a modelpod pod ({kind}); build images are run, not pulled as pods")
    staging = store.staging()
    try:
        blobs = BlobStore(staging / ".blobs")
        client.fetch_blob(source.repository, config, blobs, "pull manifest")
        manifest = _manifest(blobs.path(config.digest).read_bytes(), config.digest, source)
        announced = (doc.get("annotations") or {}).get("dev.modelpod.digest")
        if announced and announced != manifest.digest:
            raise IntegrityError(f"{source}: annotated pod digest {announced} differs from its config "
                                 f"{manifest.digest}")
        signatures = _signatures(client, source, sha256_digest(data), blobs)
        if policy is not None:
            policy.check(f"pod {manifest.name} from {source}", manifest.digest, signatures)
        existing = _existing(store, manifest)
        if existing is not None:
            _keep(store, existing, signatures)
            return existing
        pod_dir = staging / "pod"
        pod_dir.mkdir()
        for d in layers:
            path = client.fetch_blob(source.repository, d, blobs, f"pull {d.annotations.get(TITLE, d.digest[7:19])}")
            try:
                extract(path, pod_dir)
            except FileExistsError as exc:
                twice = Path(str(exc.filename)).name
                raise UnsafeArchiveError(f"{source}: a file appears in two layers ({twice})") from None
        _check_files(pod_dir, manifest, source)
        write_manifest(pod_dir, manifest)
        Pod.open(pod_dir, verify=True, expected_digest=manifest.digest)
        rec = store.add(pod_dir, manifest)
        _keep(store, rec, signatures)
        return rec
    finally:
        store.discard(staging)


def _signatures(client: Registry, source: Reference, artifact: str, blobs: BlobStore) -> list[bytes]:
    """The signature bundles attached to the artifact manifest ``artifact``."""
    found: list[bytes] = []
    for referrer in referrers(client, source.repository, artifact, SIGNATURE_ARTIFACT):
        for d, data in fetch(client, source.repository, referrer, artifact, blobs):
            with contextlib.suppress(BadSignatureError):  # junk is no signature; the policy decides
                if d.media_type == SIGNATURE_ARTIFACT:
                    found += parse_signatures(b"[" + data + b"]", f"{source} signature")
    return found


def _keep(store: Store, rec: PodRecord, signatures: list[bytes]) -> None:
    if signatures:
        add_signatures(store.open(rec.ref, verify=False).path, signatures)


def _manifest(config: bytes, digest: str, source: Reference) -> Manifest:
    try:
        manifest = Manifest.from_dict(json.loads(config))
    except ValueError:
        raise ImageError(f"{source}: the pod config is not JSON") from None
    if manifest.digest != digest:
        # The config must be the canonical form, or the pod digest would not name it.
        raise IntegrityError(f"{source}: pod config is not canonical (digest {manifest.digest} != blob {digest})")
    return manifest


def _existing(store: Store, manifest: Manifest) -> PodRecord | None:
    with contextlib.suppress(NotFoundError, PodError):
        rec = store.get(f"{manifest.name}@{manifest.digest}")
        store.open(rec.ref)  # re-verified: a damaged local copy is not "already there"
        return rec
    return None


def _check_files(pod_dir: Path, manifest: Manifest, source: Reference) -> None:
    listed = {f.path for f in manifest.files}
    present = {p.relative_to(pod_dir).as_posix() for p in pod_dir.rglob("*") if p.is_file()}
    extra = sorted(present - listed)
    if extra:
        raise UnsafeArchiveError(f"{source}: {extra[0]} is in the artifact but not in the pod manifest")
    if MANIFEST_NAME in present:
        raise UnsafeArchiveError(f"{source}: a layer carries its own {MANIFEST_NAME}")
