"""The layer plan of a pod's image, above the base: runtime, deps, weights, pod.

Each layer carries a cache key: the sha256 of everything that decides its bytes (content hashes,
paths, pins, target platform, tar settings). A key seen before means the layer's blob is already
in the cache, so rebuilding reads nothing and downloads nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.utils import canonicalize_name

import modelpod
from modelpod import __version__
from modelpod.errors import ImageError
from modelpod.image.progress import Progress
from modelpod.image.tarball import Entry, FileSource, file_entry, skipped
from modelpod.image.wheels import Pin, Target, WheelSet, ensure_wheels
from modelpod.locking import NotInstalledError, walk
from modelpod.pod import MANIFEST_NAME, RECORD_NAME, SIGNATURES_NAME, FileEntry, Pod, canonical_json

ROOT = "opt/modelpod"
RUNTIME_DIR = f"{ROOT}/runtime"
DEPS_DIR = f"{ROOT}/deps"
POD_DIR = f"{ROOT}/pod"
# Pod requirements come first so a pod's own pin of a shared library (numpy…) wins over the runtime's.
PYTHONPATH = f"/{DEPS_DIR}:/{RUNTIME_DIR}"
WEIGHTS_LAYER_BYTES = 16 * 1024 * 1024  # a weights/data file this big gets a layer of its own
_FORMAT = "modelpod-layer-v1"  # bump when the layout of any layer changes
# What a serving process imports beyond modelpod and the standard library (a test runs the server
# and compares): the runtime layer holds these and their dependencies, nothing the CLI, pack or
# build need (rich, packaging). Each is one of modelpod's core requirements (a test checks that).
SERVING = ("numpy", "pyyaml", "httptools", "uvloop; sys_platform != 'win32'", "orjson")
GRPC = ("grpcio", "protobuf")  # the gRPC endpoint, in images unless built with --no-grpc

EntryFactory = Callable[[], contextlib.AbstractContextManager[list[Entry]]]


@dataclass(frozen=True)
class LayerSpec:
    """One layer to build: what it is, its cache key, and how to get its entries when needed."""

    role: str  # runtime | deps | weights | pod
    title: str
    key: str
    entries: EntryFactory


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([_FORMAT, *parts], sort_keys=True, default=str).encode()).hexdigest()


# -- runtime ------------------------------------------------------------------------------------
def target_environment(target: Target) -> dict[str, str]:
    """Marker values for the image's interpreter (not the machine building it)."""
    env = {k: str(v) for k, v in default_environment().items()}
    env.update(
        python_version=target.python, python_full_version=f"{target.python}.0",
        implementation_name="cpython", platform_python_implementation="CPython",
        sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine=target.machine,
    )
    return env


# ``modelpod build --with FEATURE``: distributions added to the runtime layer for that feature.
FEATURES: dict[str, tuple[str, ...]] = {
    "batch": ("pyarrow",),
    "otel": ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"),  # tracing (docs/observe.md)
    "trust": ("cryptography",),  # verifying signatures and decrypting weights at load (modelpod.trust)
}


def core_pins(target: Target, grpc: bool = True, also: Sequence[str] = ()) -> list[Pin]:
    """What serving imports (``SERVING``, and ``GRPC`` unless ``grpc`` is off) and their dependencies,
    pinned to the versions installed here; ``also``: more distributions (``--with``)."""
    roots = [*SERVING, *(GRPC if grpc else ()), *also]
    try:
        found = walk(roots, target_environment(target), strict=True, needed_by="the image's modelpod runtime")
    except NotInstalledError as exc:
        if grpc and canonicalize_name(exc.name) in GRPC:
            raise ImageError(f"images serve gRPC by default, and {exc.name} is not installed here: "
                             "pip install 'modelpod[grpc]', or build with --no-grpc") from None
        raise ImageError(f"{exc}; reinstall modelpod") from None
    return sorted((Pin.parse(text) for text in found.values()), key=lambda p: p.name)


def _package_files() -> list[tuple[str, Path]]:
    """modelpod's own source files (wherever it is installed, editable or not), bytecode left out."""
    root = Path(modelpod.__file__).parent
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and not skipped(rel):
            out.append((f"modelpod/{rel}", path))
    return out


def _dist_info(pins: Sequence[Pin], files: Sequence[tuple[str, Path]] = ()) -> dict[str, bytes]:
    """A minimal dist-info so ``importlib.metadata.version('modelpod')`` works in the image; its RECORD
    lists every file's sha256, as a wheel's does (the SBOM hashes it)."""
    meta = metadata.distribution("modelpod").metadata
    lines = ["Metadata-Version: 2.1", f"Name: {meta['Name']}", f"Version: {__version__}",
             f"Requires-Python: {meta['Requires-Python'] or ''}"]
    if meta["License-Expression"] or meta["License"]:
        lines.append(f"License: {meta['License-Expression'] or meta['License']}")
    lines += [f"Requires-Dist: {p.text}" for p in pins]
    info = f"modelpod-{__version__}.dist-info"
    out = {f"{info}/METADATA": ("\n".join(lines) + "\n").encode(), f"{info}/INSTALLER": b"modelpod\n",
           f"{info}/top_level.txt": b"modelpod\n"}
    record = [f"{rel},sha256={_b64(hashlib.sha256(path.read_bytes()).digest())},{path.stat().st_size}"
              for rel, path in files]
    record += [f"{name},sha256={_b64(hashlib.sha256(data).digest())},{len(data)}" for name, data in sorted(out.items())]
    out[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    return out


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def runtime_layer(target: Target, wheel_cache: Path, progress: Progress,
                  features: Sequence[str] = (), grpc: bool = True) -> tuple[LayerSpec, list[Pin]]:
    """modelpod and what serving imports (and what ``features`` need), as site-packages under /opt/modelpod/runtime."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ImageError(f"--with {', '.join(unknown)}: unknown; choose from {', '.join(FEATURES)}")
    pins = core_pins(target, grpc, also=[d for f in features for d in FEATURES[f]])
    files = _package_files()
    extra = _dist_info(pins, files)
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    key = _key("runtime", target.pip_args(), [p.text for p in pins], digest.hexdigest(), sorted(extra.items()))

    @contextlib.contextmanager
    def entries() -> Iterator[list[Entry]]:
        wheels = ensure_wheels(pins, target, wheel_cache, progress)
        with WheelSet(wheels) as ws:
            own = [Entry(f"{RUNTIME_DIR}/{rel}", "file", 0o644, path.stat().st_size, FileSource(path))
                   for rel, path in files]
            own += [file_entry(f"{RUNTIME_DIR}/{rel}", data) for rel, data in extra.items()]
            yield [*ws.entries(RUNTIME_DIR), *own]

    title = f"runtime (modelpod {__version__}{', gRPC' if grpc else ''})"
    return LayerSpec("runtime", title, key, entries), pins


def deps_layer(pod: Pod, target: Target, runtime: Sequence[Pin], wheel_cache: Path,
               progress: Progress) -> LayerSpec | None:
    """The pod's locked requirements the runtime does not already hold (same name and version)."""
    have = {(p.name, p.version) for p in runtime}
    pins = sorted({p for p in (Pin.parse(r) for r in pod.manifest.requirements) if (p.name, p.version) not in have},
                  key=lambda p: p.name)
    if not pins:
        return None
    key = _key("deps", target.pip_args(), [p.text for p in pins])

    @contextlib.contextmanager
    def entries() -> Iterator[list[Entry]]:
        wheels = ensure_wheels(pins, target, wheel_cache, progress)
        with WheelSet(wheels) as ws:
            yield ws.entries(DEPS_DIR)

    return LayerSpec("deps", f"deps ({len(pins)} packages)", key, entries)


# -- the pod ------------------------------------------------------------------------------------
def pod_layers(pod: Pod, threshold: int = WEIGHTS_LAYER_BYTES,
               record: Mapping[str, Any] | None = None) -> list[LayerSpec]:
    """Large weights/data files one layer each, the other weights/data together, then manifest + code
    (and ``record``: the pod's version and aliases in the store, beside the manifest)."""
    heavy = [f for f in pod.manifest.files if f.role in ("weights", "data")]
    alone = sorted((f for f in heavy if f.size >= threshold), key=lambda f: f.path)
    together = sorted((f for f in heavy if f.size < threshold), key=lambda f: f.path)
    rest = sorted((f for f in pod.manifest.files if f.role not in ("weights", "data")), key=lambda f: f.path)
    specs = [_files_layer(pod, "weights", f"weights {f.path}", [f]) for f in alone]
    if together:
        specs.append(_files_layer(pod, "weights", f"weights ({len(together)} files)", together))
    manifest = pod.manifest.to_yaml().encode()
    extra = {RECORD_NAME: canonical_json(dict(record))} if record else {}
    if (pod.path / SIGNATURES_NAME).is_file():  # the pod's signatures, for require_signed in the image
        extra[SIGNATURES_NAME] = (pod.path / SIGNATURES_NAME).read_bytes()
    key = _key("pod", pod.digest, [(f.path, f.sha256, f.size) for f in rest], sorted(extra.items()), "tmp")

    @contextlib.contextmanager
    def entries() -> Iterator[list[Entry]]:
        # /tmp, world-writable and sticky, is the image's one writable place (a volume in the config,
        # so it stays writable under ``docker run --read-only``).
        yield [*_pod_entries(pod, rest), file_entry(f"{POD_DIR}/{MANIFEST_NAME}", manifest),
               *(file_entry(f"{POD_DIR}/{name}", data) for name, data in extra.items()), Entry("tmp", "dir", 0o1777)]

    specs.append(LayerSpec("pod", f"manifest + code ({len(rest)} files)", key, entries))
    return specs


def _files_layer(pod: Pod, role: str, title: str, files: Sequence[FileEntry]) -> LayerSpec:
    key = _key(role, [(f.path, f.sha256, f.size) for f in files])

    @contextlib.contextmanager
    def entries() -> Iterator[list[Entry]]:
        yield _pod_entries(pod, files)

    return LayerSpec(role, title, key, entries)


def _pod_entries(pod: Pod, files: Sequence[FileEntry]) -> list[Entry]:
    return [Entry(f"{POD_DIR}/{f.path}", "file", 0o644, f.size, FileSource(pod.path / f.path)) for f in files]


