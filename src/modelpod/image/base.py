"""Base images: read one from a registry, an OCI layout or a docker archive; find its CPython.

The interpreter is found by reading the base's layers (no container runs): the last layer to write
``usr/local/bin/python3.X`` or ``usr/bin/python3.X`` (or the ``python3`` link to one) wins, with
whiteouts honoured. glibc's version, read from ``libc.so.6``, bounds the manylinux wheels we pick.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpod.errors import ImageError
from modelpod.image.oci import (
    DOCKER_CONFIG,
    INDEXES,
    MANIFESTS,
    OCI_CONFIG,
    BlobStore,
    Descriptor,
    atomic_write,
    oci_layer_type,
    pick_platform,
    read_docker_archive,
    read_layout,
    sha256_digest,
)
from modelpod.image.registry import Reference, Registry, RegistryHTTPError
from modelpod.image.tarball import open_layer

DEFAULT_BASE = "python:3.11-slim"


def default_base(python: str) -> str:
    """The official CPython image matching the pod (``python:3.11-slim`` for a 3.11 pod)."""
    return f"python:{python}-slim" if python else DEFAULT_BASE
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
_PYTHON = re.compile(r"^(usr/local/bin|usr/bin)/python3(\.\d+)?$")
_LIBC = re.compile(r"^(usr/)?lib(64)?/([a-z0-9_]+-linux-gnu/)?libc\.so\.6$")
_MUSL = re.compile(r"^(usr/)?lib/ld-musl-[a-z0-9_]+\.so\.1$")
_GLIBC_TEXT = re.compile(rb"GNU C Library [^\n]*?version (\d+)\.(\d+)")
_GLIBC_NAME = re.compile(r"libc-(\d+)\.(\d+)\.so$")


@dataclass(frozen=True)
class BaseImage:
    """A base image whose config and layer blobs are all in the local blob cache."""

    name: str  # as the user gave it, for messages
    reference: Reference | None  # set for registry bases
    digest: str | None  # the base manifest's digest, when there is one
    config: Mapping[str, Any]
    layers: tuple[Descriptor, ...]  # OCI media types

    @property
    def architecture(self) -> str:
        return str(self.config.get("architecture") or "amd64")


@dataclass(frozen=True)
class Interpreter:
    path: str  # absolute, in the image: "/usr/bin/python3.11"
    version: str  # "3.11"
    glibc: tuple[int, int] | None
    machine: str  # x86_64 | aarch64


def load_base(spec: str, store: BlobStore, registry: Callable[[str], Registry], *,
              arch: str = "amd64") -> BaseImage:
    """Read the base named by ``spec`` (``oci:DIR[:TAG]``, ``docker-archive:FILE`` or a reference)."""
    if spec.startswith("oci:"):
        directory, tag = _split_layout(spec[4:])
        data, media = read_layout(directory, tag, arch=arch)
        manifest = _parse_manifest(data, media, spec)
        for d in (manifest["config"], *manifest["layers"]):
            _copy_blob(directory, d, store)
        return _finish(spec, None, sha256_digest(data), manifest, store)
    if spec.startswith("docker-archive:"):
        path = Path(spec.removeprefix("docker-archive:"))
        if not path.is_file():
            raise ImageError(f"base {spec}: no such file")
        config, layers = read_docker_archive(path, store)
        return _check(BaseImage(spec, None, None, config, tuple(layers)))
    ref = Reference.parse(spec.removeprefix("docker://"))
    client = registry(ref.host)
    try:
        data, media = client.get_manifest(ref.repository, ref.reference)
        if media in INDEXES:
            chosen = pick_platform(json.loads(data), "linux", arch)
            data, media = client.get_manifest(ref.repository, chosen.digest)
    except RegistryHTTPError as exc:
        if exc.status == 404:
            raise ImageError(f"base image {ref} not found in its registry") from None
        raise
    manifest = _parse_manifest(data, media, str(ref))
    client.fetch_blob(ref.repository, manifest["config"], store, "base config")
    for i, d in enumerate(manifest["layers"], start=1):
        client.fetch_blob(ref.repository, d, store, f"base layer {i}/{len(manifest['layers'])}")
    return _finish(str(ref), ref, sha256_digest(data), manifest, store)


def _split_layout(value: str) -> tuple[Path, str | None]:
    """``DIR`` or ``DIR:TAG`` (a colon after the last slash starts the tag unless DIR exists as is)."""
    if Path(value).is_dir() or ":" not in value.rsplit("/", 1)[-1]:
        return Path(value), None
    directory, _, tag = value.rpartition(":")
    return Path(directory), tag


def _parse_manifest(data: bytes, media: str, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        raise ImageError(f"base {name}: the manifest is not JSON") from None
    media = doc.get("mediaType") or media
    if media not in MANIFESTS or doc.get("schemaVersion") != 2:
        raise ImageError(f"base {name}: unsupported manifest type {media!r} (want OCI or docker schema 2)")
    config = Descriptor.from_dict(doc["config"])
    if config.media_type not in (OCI_CONFIG, DOCKER_CONFIG):
        raise ImageError(f"base {name}: is not a container image (config type {config.media_type})")
    layers = [Descriptor.from_dict(d) for d in doc.get("layers") or ()]
    return {"config": config, "layers": [Descriptor(oci_layer_type(d.media_type), d.digest, d.size) for d in layers]}


def _copy_blob(directory: Path, d: Descriptor, store: BlobStore) -> None:
    if store.has(d.digest):
        return
    src = directory / "blobs" / "sha256" / d.digest.removeprefix("sha256:")
    if not src.is_file():
        raise ImageError(f"{directory}: blob {d.digest[:19]}… is missing")
    with src.open("rb") as fh, store.writer() as w:
        h = hashlib.sha256()
        while block := fh.read(1 << 20):
            h.update(block)
            w.write(block)
        if "sha256:" + h.hexdigest() != d.digest:
            raise ImageError(f"{directory}: blob {d.digest[:19]}… does not match its digest")
        w.finish(d.digest)


def _finish(name: str, ref: Reference | None, digest: str, manifest: dict[str, Any], store: BlobStore) -> BaseImage:
    config_desc: Descriptor = manifest["config"]
    store.verify(config_desc.digest)
    config = json.loads(store.path(config_desc.digest).read_bytes())
    return _check(BaseImage(name, ref, digest, config, tuple(manifest["layers"])))


def _check(base: BaseImage) -> BaseImage:
    if base.config.get("os", "linux") != "linux":
        raise ImageError(f"base {base.name}: os {base.config.get('os')!r} is not linux")
    diff_ids = (base.config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(base.layers):
        raise ImageError(f"base {base.name}: config lists {len(diff_ids)} layers, manifest {len(base.layers)}")
    if base.architecture not in MACHINES:
        raise ImageError(f"base {base.name}: architecture {base.architecture!r} is not supported "
                         f"({', '.join(MACHINES)})")
    return base


# -- finding CPython --------------------------------------------------------------------------------
def find_python(base: BaseImage, store: BlobStore, want: str, cache: Path | None = None) -> Interpreter:
    """The base's CPython ``want`` ("3.11"); a clear ImageError when it has none or another version."""
    scan = _scan_cached(base, store, cache)
    files: dict[str, str] = scan["files"]  # path -> "file" | "symlink:<target>"
    if scan["musl"]:
        raise ImageError(f"base {base.name} is musl-based (Alpine); use a glibc base such as {DEFAULT_BASE}")
    found: dict[str, str] = {}  # real interpreter path -> version
    preferred: list[str] = []
    for path in sorted(files):
        real = _resolve(files, path)
        if real is None:
            continue
        m = re.search(r"python(3\.\d+)$", real)
        if m:
            found[real] = m.group(1)
            if path.endswith("/python3"):
                preferred.append(real)
    if not found:
        raise ImageError(f"no CPython in base {base.name} (looked for usr/local/bin/python3.X and usr/bin/python3.X)")
    matching = [p for p in found if found[p] == want]
    if not matching:
        have = ", ".join(f"{v} (/{p})" for p, v in sorted(found.items()))
        raise ImageError(f"base {base.name} has Python {have}; the pod needs Python {want}: "
                         f"use a base with CPython {want}, e.g. python:{want}-slim")
    # The python3 link's target first, then /usr/local (where python images put theirs).
    matching.sort(key=lambda p: (p not in preferred, not p.startswith("usr/local/"), p))
    glibc = (int(scan["glibc"][0]), int(scan["glibc"][1])) if scan["glibc"] else None
    return Interpreter("/" + matching[0], want, glibc, MACHINES[base.architecture])


def _resolve(files: Mapping[str, str], path: str) -> str | None:
    for _ in range(16):
        kind = files.get(path)
        if kind is None:
            return None
        if kind == "file":
            return path
        link = kind.removeprefix("symlink:")
        joined = link.lstrip("/") if link.startswith("/") else posixpath.join(posixpath.dirname(path), link)
        path = posixpath.normpath(joined)
    return None


def _scan_cached(base: BaseImage, store: BlobStore, cache: Path | None) -> dict[str, Any]:
    key = hashlib.sha256("\n".join(d.digest for d in base.layers).encode()).hexdigest()
    path = cache / f"{key}.json" if cache else None
    if path is not None and path.is_file():
        result: dict[str, Any] = json.loads(path.read_text())
        return result
    result = _scan(base, store)
    if path is not None:
        atomic_write(path, json.dumps(result, sort_keys=True).encode())
    return result


def _scan(base: BaseImage, store: BlobStore) -> dict[str, Any]:
    files: dict[str, tuple[int, str]] = {}  # path -> (layer index, kind)
    glibc: list[int] | None = None
    musl = False
    for index, layer in enumerate(base.layers):
        with open_layer(store.path(layer.digest)) as tar:
            for member in tar:
                name = posixpath.normpath(member.name.lstrip("/")).removeprefix("./")
                directory, leaf = posixpath.split(name)
                if leaf == ".wh..wh..opq":
                    prefix = f"{directory}/" if directory else ""
                    files = {p: v for p, v in files.items() if not (p.startswith(prefix) and v[0] < index)}
                    continue
                if leaf.startswith(".wh."):
                    gone = posixpath.join(directory, leaf[4:])
                    files = {p: v for p, v in files.items() if p != gone and not p.startswith(gone + "/")}
                    continue
                if _MUSL.match(name):
                    musl = True
                if _PYTHON.match(name):
                    if member.issym():
                        files[name] = (index, "symlink:" + member.linkname)
                    elif member.isfile() or member.islnk():
                        files[name] = (index, "file")
                elif _LIBC.match(name):
                    glibc = _glibc_version(tar, member) or glibc
    return {"files": {p: v[1] for p, v in files.items()}, "glibc": glibc, "musl": musl}


def _glibc_version(tar: Any, member: Any) -> list[int] | None:
    if member.issym():
        named = _GLIBC_NAME.search(member.linkname)
        return [int(named.group(1)), int(named.group(2))] if named else None
    if not member.isfile():
        return None
    fh = tar.extractfile(member)
    text = _GLIBC_TEXT.search(fh.read()) if fh is not None else None
    return [int(text.group(1)), int(text.group(2))] if text else None
