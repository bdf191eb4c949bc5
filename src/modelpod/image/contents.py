"""What an image holds, read from its layer blobs (no container runs): Python distributions, the
base's Debian packages, the pod's files.

Facts relied on: a wheel installs ``NAME-VERSION.dist-info/`` with ``METADATA`` (core metadata, an
email-style header block), ``WHEEL`` (its ``Tag:`` lines) and ``RECORD``; dpkg keeps what is
installed in ``var/lib/dpkg/status``, one RFC 822 stanza per package, ``Status: install ok
installed`` for the ones present; ``etc/os-release`` (often a link to ``usr/lib/os-release``)
names the distribution. Later layers win; whiteouts (``.wh.NAME``) delete.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from modelpod.image.oci import BlobStore, Descriptor, atomic_write
from modelpod.image.plan import DEPS_DIR, POD_DIR, RUNTIME_DIR
from modelpod.image.tarball import open_layer
from modelpod.pod import MANIFEST_NAME, RECORD_NAME, SIGNATURES_NAME, Manifest, sha256_file

_DIST_INFO = re.compile(r"^(?P<site>.+)/(?P<dir>[^/]+)\.dist-info/(?P<file>METADATA|WHEEL|RECORD)$")
_DPKG_STATUS = "var/lib/dpkg/status"
_OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
SITES = {RUNTIME_DIR: "runtime", DEPS_DIR: "deps"}


@dataclass(frozen=True)
class PythonDist:
    name: str  # as METADATA spells it
    version: str
    license: str | None  # an SPDX expression, a license name, or a classifier's name
    site: str  # /opt/modelpod/runtime | /opt/modelpod/deps
    layer: str  # the layer blob's digest
    tags: tuple[str, ...]  # the WHEEL file's tags
    record_sha256: str | None  # the RECORD file's sha256 (it lists every installed file's hash)
    wheel: str | None = None  # the wheel file it was installed from, when found in the wheel cache
    wheel_sha256: str | None = None


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    source: str | None
    maintainer: str | None
    homepage: str | None


@dataclass(frozen=True)
class PodFile:
    path: str  # relative to the pod directory
    sha256: str
    size: int
    role: str  # weights | data | code | config | manifest | record | signatures | other


@dataclass
class ImageContents:
    python: list[PythonDist] = field(default_factory=list)
    debian: list[DebPackage] = field(default_factory=list)
    os_release: dict[str, str] = field(default_factory=dict)
    pod_files: list[PodFile] = field(default_factory=list)
    manifest: Manifest | None = None


def scan(store: BlobStore, base_layers: Sequence[Descriptor], modelpod_layers: Sequence[Descriptor],
         wheel_cache: Path | None = None) -> ImageContents:
    """Read the base layers for dpkg and os-release, the modelpod layers for dists and pod files."""
    out = ImageContents()
    status, os_release = _base_files(store, base_layers)
    out.debian = parse_dpkg_status(status) if status is not None else []
    out.os_release = parse_os_release(os_release) if os_release is not None else {}
    raw: dict[str, dict[str, bytes]] = {}  # "<site>/<dir>" -> file -> bytes
    where: dict[str, str] = {}
    files: dict[str, tuple[str, int]] = {}
    manifest_text: bytes | None = None
    for layer in modelpod_layers:
        with open_layer(store.path(layer.digest)) as tar:
            for member in tar:
                name = posixpath.normpath(member.name.lstrip("/")).removeprefix("./")
                if not member.isfile():
                    continue
                m = _DIST_INFO.match(name)
                if m and m.group("site") in SITES:
                    key = f"{m.group('site')}/{m.group('dir')}"
                    fh = tar.extractfile(member)
                    raw.setdefault(key, {})[m.group("file")] = fh.read() if fh else b""
                    where[key] = layer.digest
                if name.startswith(POD_DIR + "/"):
                    rel = name[len(POD_DIR) + 1:]
                    fh = tar.extractfile(member)
                    h = hashlib.sha256()
                    while fh is not None and (block := fh.read(1 << 20)):
                        h.update(block)
                        if rel == MANIFEST_NAME:
                            manifest_text = (manifest_text or b"") + block
                    files[rel] = (h.hexdigest(), member.size)
    if manifest_text is not None:
        out.manifest = Manifest.from_yaml(manifest_text.decode("utf-8"))
    roles = {f.path: f.role for f in out.manifest.files} if out.manifest else {}
    roles |= {MANIFEST_NAME: "manifest", RECORD_NAME: "record", SIGNATURES_NAME: "signatures"}
    out.pod_files = [PodFile(rel, sha, size, roles.get(rel, "other")) for rel, (sha, size) in sorted(files.items())]
    wheels = _wheel_index(wheel_cache)
    for key in sorted(raw):
        dist = _dist(key, raw[key], where[key], wheels)
        if dist is not None:
            out.python.append(dist)
    out.python.sort(key=lambda d: (d.site, canonicalize_name(d.name)))
    return out


def scan_cached(store: BlobStore, base_layers: Sequence[Descriptor], modelpod_layers: Sequence[Descriptor],
                wheel_cache: Path | None, cache: Path) -> ImageContents:
    """``scan``, remembered under ``cache`` by the layers' digests (a rebuild reads no layer again)."""
    key = hashlib.sha256(json.dumps([[d.digest for d in base_layers], [d.digest for d in modelpod_layers],
                                     str(wheel_cache)]).encode()).hexdigest()
    path = cache / f"{key}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return ImageContents(
                [PythonDist(**{**d, "tags": tuple(d["tags"])}) for d in data["python"]],
                [DebPackage(**d) for d in data["debian"]], dict(data["os_release"]),
                [PodFile(**f) for f in data["pod_files"]],
                Manifest.from_yaml(data["manifest"]) if data.get("manifest") else None)
        except (ValueError, KeyError, TypeError):
            pass  # an older or damaged record: scan again
    got = scan(store, base_layers, modelpod_layers, wheel_cache)
    record = {"python": [asdict(d) for d in got.python], "debian": [asdict(p) for p in got.debian],
              "os_release": got.os_release, "pod_files": [asdict(f) for f in got.pod_files],
              "manifest": got.manifest.to_yaml() if got.manifest else None}
    atomic_write(path, json.dumps(record, sort_keys=True).encode())
    return got


def _base_files(store: BlobStore, layers: Sequence[Descriptor]) -> tuple[bytes | None, bytes | None]:
    """The dpkg status file and os-release as the top of the base layers leaves them."""
    wanted = {_DPKG_STATUS, *_OS_RELEASE}
    found: dict[str, bytes | str] = {}  # path -> bytes, or "link:<target>"
    for layer in layers:
        with open_layer(store.path(layer.digest)) as tar:
            for member in tar:
                name = posixpath.normpath(member.name.lstrip("/")).removeprefix("./")
                directory, leaf = posixpath.split(name)
                if leaf.startswith(".wh."):
                    gone = directory if leaf == ".wh..wh..opq" else posixpath.join(directory, leaf[4:])
                    found = {p: v for p, v in found.items() if p != gone and not p.startswith(gone + "/")}
                    continue
                if name not in wanted:
                    continue
                if member.issym():
                    found[name] = "link:" + member.linkname
                elif member.isfile():
                    fh = tar.extractfile(member)
                    found[name] = fh.read() if fh else b""
    status = found.get(_DPKG_STATUS)
    release: bytes | str | None = None
    for path in _OS_RELEASE:
        value = found.get(path)
        for _ in range(4):  # follow a link or two (etc/os-release -> ../usr/lib/os-release)
            if not isinstance(value, str):
                break
            target = value.removeprefix("link:")
            joined = target.lstrip("/") if target.startswith("/") else posixpath.join(posixpath.dirname(path), target)
            path = posixpath.normpath(joined)
            value = found.get(path)
        if isinstance(value, bytes):
            release = value
            break
    return (status if isinstance(status, bytes) else None), (release if isinstance(release, bytes) else None)


def parse_dpkg_status(data: bytes) -> list[DebPackage]:
    """The installed packages in a dpkg status file."""
    out: list[DebPackage] = []
    for stanza in re.split(r"\n\s*\n", data.decode("utf-8", "replace")):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                continue  # a continuation line (Description, Conffiles): not needed
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if not fields.get("Package") or not fields.get("Version"):
            continue
        if fields.get("Status", "").split()[-1:] != ["installed"]:
            continue
        source = fields.get("Source", "").split(" ")[0] or None
        out.append(DebPackage(fields["Package"], fields["Version"], fields.get("Architecture", ""), source,
                              fields.get("Maintainer"), fields.get("Homepage")))
    return sorted(out, key=lambda p: (p.name, p.architecture))


def parse_os_release(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            out[key.strip()] = value.strip().strip("\"'")
    return out


def _wheel_index(cache: Path | None) -> dict[tuple[str, str], list[tuple[frozenset[str], Path]]]:
    index: dict[tuple[str, str], list[tuple[frozenset[str], Path]]] = {}
    if cache is None or not cache.is_dir():
        return index
    for whl in sorted(cache.glob("*.whl")):
        try:
            name, version, _, tags = parse_wheel_filename(whl.name)
        except InvalidWheelFilename:
            continue
        index.setdefault((str(name), str(version)), []).append((frozenset(str(t) for t in tags), whl))
    return index


def _dist(key: str, files: Mapping[str, bytes], layer: str,
          wheels: Mapping[tuple[str, str], list[tuple[frozenset[str], Path]]]) -> PythonDist | None:
    if "METADATA" not in files:
        return None
    meta = email.parser.BytesHeaderParser().parsebytes(files["METADATA"])
    name, version = str(meta.get("Name") or ""), str(meta.get("Version") or "")
    if not name or not version:
        return None
    wheel_meta = email.parser.BytesHeaderParser().parsebytes(files.get("WHEEL", b""))
    tags = tuple(sorted(str(t) for t in (wheel_meta.get_all("Tag") or [])))
    record = files.get("RECORD")
    wheel, wheel_sha = None, None
    try:
        normal = str(Version(version))
    except InvalidVersion:
        normal = version
    for wheel_tags, path in wheels.get((str(canonicalize_name(name)), normal), []):
        if not tags or set(tags) <= wheel_tags:
            wheel, wheel_sha = path.name, sha256_file(path)
            break
    site = "/" + key.rsplit("/", 1)[0]
    return PythonDist(name, version, license_of(meta.get("License-Expression"), meta.get("License"),
                                                meta.get_all("Classifier") or []),
                      site, layer, tags, hashlib.sha256(record).hexdigest() if record is not None else None,
                      wheel, wheel_sha)


def license_of(expression: object, text: object, classifiers: Iterable[object]) -> str | None:
    """License-Expression, else a one-line License field, else the classifiers' license names."""
    if expression and str(expression).strip():
        return str(expression).strip()
    value = str(text or "").strip()
    if value and "\n" not in value and len(value) <= 100 and value.upper() not in ("UNKNOWN", "NONE"):
        return value
    names = [str(c).split("::")[-1].strip() for c in classifiers if str(c).startswith("License ::")]
    names = [n for n in names if n not in ("OSI Approved", "")]
    return " AND ".join(sorted(set(names))) if names else None
