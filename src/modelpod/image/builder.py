"""ImageBuilder: a pod -> a runnable OCI image, with no daemon and no container run.

Layers bottom to top: the base's (unchanged), the modelpod runtime, the pod's requirements, the
weights, the manifest + code (see ``plan``). Config and manifest are JSON with sorted keys and
fixed times, so the same pod and base give the same image digest on every build.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelpod import __version__
from modelpod.errors import ImageError
from modelpod.image.base import BaseImage, Interpreter, default_base, find_python, load_base
from modelpod.image.oci import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BlobStore,
    Descriptor,
    Image,
    atomic_write,
    to_json,
    write_docker_archive,
    write_layout,
)
from modelpod.image.plan import (
    POD_DIR,
    PYTHONPATH,
    WEIGHTS_LAYER_BYTES,
    LayerSpec,
    deps_layer,
    pod_layers,
    runtime_layer,
)
from modelpod.image.progress import Progress, Silent
from modelpod.image.registry import Reference, Registry, Transfers
from modelpod.image.tarball import GZIP_LEVEL, write_layer
from modelpod.image.wheels import Target
from modelpod.pod import Pod

USER = "65532:65532"
PORT = 8080
GRPC_PORT = 8081
# The healthcheck runs beside the server, so it cannot see the server's arguments: it reads them
# from /proc (``IMAGE --port 9000`` is probed on 9000), then $MODELPOD_PORT, then 8080; HTTPS when
# the server has ``--tls-cert`` or $MODELPOD_TLS_CERT (its own certificate on loopback: not verified).
HEALTH_PROBE = """\
import os, ssl, sys, urllib.request
TLS = [bool(os.environ.get("MODELPOD_TLS_CERT"))]
def port():
    pids = ["1"] + sorted(p for p in os.listdir("/proc") if p.isdigit() and p != "1")
    for pid in pids:
        try:
            args = open("/proc/%s/cmdline" % pid, "rb").read().decode(errors="replace").split("\\0")
        except OSError:
            continue
        if not any(a == "modelpod" or a.startswith("modelpod.") for a in args):  # -m modelpod[.entry]
            continue
        TLS[0] = TLS[0] or any(a == "--tls-cert" or a.startswith("--tls-cert=") for a in args)
        for i, arg in enumerate(args):
            if arg == "--port" and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith("--port="):
                return arg[7:]
        break
    return os.environ.get("MODELPOD_PORT") or "8080"
where = port()
ctx = ssl._create_unverified_context() if TLS[0] else None
urllib.request.urlopen("%s://127.0.0.1:%s/v2/health/ready" % ("https" if TLS[0] else "http", where), timeout=4,
                       context=ctx)
sys.exit(0)
"""
ANNOTATION_DIGEST = "dev.modelpod.digest"
ANNOTATION_BASE_LAYERS = "dev.modelpod.base.layers"
ANNOTATION_PYTHON = "dev.modelpod.python"


@dataclass(frozen=True)
class BuildOptions:
    base: str | None = None  # None: python:<the pod's python>-slim from Docker Hub
    created: int = 0  # the image's time, seconds since the epoch (SOURCE_DATE_EPOCH, else the pack time)
    # Time of every file in the new layers (SOURCE_DATE_EPOCH, else 0): not the pack time, so the
    # runtime and deps layers of pods packed at different times stay the same blobs.
    mtime: int = 0
    source: str | None = None  # org.opencontainers.image.source
    revision: str | None = None  # org.opencontainers.image.revision (default: the pod digest)
    weights_layer_bytes: int = WEIGHTS_LAYER_BYTES
    gzip_level: int | None = GZIP_LEVEL
    arch: str = "amd64"
    features: tuple[str, ...] = ()  # --with: extras in the runtime layer, e.g. ("batch",) adds pyarrow
    grpc: bool = True  # grpcio in the runtime layer: the image serves gRPC (port 8081) too
    check: bool = True  # load and predict the sample with only the image's packages before writing


@dataclass(frozen=True)
class BuiltLayer:
    role: str  # base | runtime | deps | weights | pod
    title: str
    descriptor: Descriptor
    diff_id: str
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "title": self.title, "digest": self.descriptor.digest, "diff_id": self.diff_id,
                "size": self.descriptor.size, "media_type": self.descriptor.media_type, "cached": self.cached}


@dataclass(frozen=True)
class BuiltImage:
    image: Image
    layers: tuple[BuiltLayer, ...]
    interpreter: Interpreter
    base: BaseImage
    annotations: Mapping[str, str] = field(default_factory=dict)
    load_check: str = "not run"

    @property
    def digest(self) -> str:
        return self.image.digest

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "config": self.image.config.digest,
                "size": sum(d.size for d in self.image.layers) + self.image.config.size + len(self.image.manifest),
                "base": self.base.name, "python": self.interpreter.path, "load_check": self.load_check,
                "layers": [layer.to_dict() for layer in self.layers]}


class ImageBuilder:
    """Builds images into a blob cache under ``cache`` (``$MODELPOD_HOME/cache``)."""

    def __init__(self, cache: Path, registry: Callable[[str], Registry] | None = None,
                 progress: Progress | None = None) -> None:
        self.cache = Path(cache)
        self.blobs = BlobStore(self.cache / "blobs")
        self.registry = registry or (lambda host: Registry(host, progress=self.progress))
        self.progress = progress or Silent()

    # -- build ----------------------------------------------------------------------------------
    def build(self, pod: Pod, version: int | None = None, options: BuildOptions | None = None,
              aliases: Sequence[str] = ()) -> BuiltImage:
        """The image of ``pod``; ``version`` and ``aliases`` (its store record) are served as such."""
        opts = options or BuildOptions()
        want = pod.manifest.python or ""
        if not want:
            raise ImageError(f"pod {pod.name} does not say which Python it needs (manifest 'python' is empty)")
        base = load_base(opts.base or default_base(want), self.blobs, self.registry, arch=opts.arch)
        python = find_python(base, self.blobs, want, self.cache / "bases")
        target = Target(want, python.machine, python.glibc or (2, 17))
        runtime, pins = runtime_layer(target, self.cache / "wheels", self.progress, opts.features, grpc=opts.grpc)
        deps = deps_layer(pod, target, pins, self.cache / "wheels", self.progress)
        record = {"digest": pod.digest, "version": version, "aliases": sorted(aliases)} if version else None
        specs = [runtime, *([deps] if deps else []), *pod_layers(pod, opts.weights_layer_bytes, record)]
        load_check = "off (--no-check)"
        if opts.check:
            from modelpod.image.check import check

            task = self.progress.task("load check (the pod with only the image's packages)", 1)
            load_check = check(pod, specs, target, self.cache / "trees")
            task.done()
        # zlib and hashing release the GIL: the big layers (runtime, deps) compress side by side.
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            ours = list(pool.map(lambda spec: self._layer(spec, opts), specs))
        annotations = {**self._annotations(pod, version, opts), **base_annotations(base, python)}
        return self.assemble(base, python, ours, annotations, opts, load_check)

    def assemble(self, base: BaseImage, python: Interpreter, ours: Sequence[BuiltLayer],
                 annotations: Mapping[str, str], opts: BuildOptions, load_check: str = "not run") -> BuiltImage:
        """Config and manifest of ``base`` + ``ours`` (the modelpod layers, already in the blob cache)."""
        diff_ids = list((base.config.get("rootfs") or {}).get("diff_ids") or [])
        built = [BuiltLayer("base", f"base layer {i + 1}", d, diff_ids[i]) for i, d in enumerate(base.layers)]
        built += ours
        annotations = dict(sorted(annotations.items()))
        config = self._config(base, python, built, annotations, opts)
        config_desc = Descriptor(OCI_CONFIG, self.blobs.put_bytes(config), len(config))
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_dict(),
            "layers": [b.descriptor.to_dict() for b in built], "annotations": annotations,
        }
        image = Image(to_json(manifest), OCI_MANIFEST, config_desc, tuple(b.descriptor for b in built))
        return BuiltImage(image, tuple(built), python, base, annotations, load_check)

    def sbom(self, built: BuiltImage) -> bytes:
        """The image's CycloneDX SBOM, read from its layers (hashes of wheels from the wheel cache)."""
        from modelpod.image.contents import scan_cached
        from modelpod.image.sbom import make_sbom

        task = self.progress.task("SBOM (CycloneDX 1.6)", 1)
        ours = [b.descriptor for b in built.layers if b.role != "base"]
        contents = scan_cached(self.blobs, built.base.layers, ours, self.cache / "wheels", self.cache / "sbom")
        created = _epoch(built.annotations.get("org.opencontainers.image.created"))
        # The base by name only when it is a registry reference: a local path would differ per machine.
        base = built.annotations.get("org.opencontainers.image.base.name") or \
            built.annotations.get("org.opencontainers.image.base.digest")
        data = make_sbom(contents, image_digest=built.digest, created=created, base=base,
                         name=built.annotations.get("org.opencontainers.image.title") or "image")
        task.done()
        return data

    def _layer(self, spec: LayerSpec, opts: BuildOptions) -> BuiltLayer:
        key = hashlib.sha256(f"{spec.key}:{opts.mtime}:{opts.gzip_level}".encode()).hexdigest()
        record = self.cache / "layers" / f"{key}.json"
        if record.is_file():
            data = json.loads(record.read_text())
            if self.blobs.has(data["digest"]):
                desc = Descriptor(data["media_type"], data["digest"], data["size"])
                return BuiltLayer(spec.role, spec.title, desc, data["diff_id"], cached=True)
        with spec.entries() as entries:
            task = self.progress.task(f"layer {spec.title}", sum(e.size for e in entries))
            with self.blobs.writer() as w:
                got = write_layer(entries, w, mtime=opts.mtime, gzip_level=opts.gzip_level, on_bytes=task.advance)
                w.finish(got.digest)
            task.done()
        media = OCI_LAYER_GZIP if got.compressed else OCI_LAYER
        atomic_write(record, to_json({"digest": got.digest, "diff_id": got.diff_id, "size": got.size,
                                      "media_type": media}))
        return BuiltLayer(spec.role, spec.title, Descriptor(media, got.digest, got.size), got.diff_id)

    def _annotations(self, pod: Pod, version: int | None, opts: BuildOptions) -> dict[str, str]:
        labels = pod.manifest.labels
        source = (opts.source or labels.get("org.opencontainers.image.source")
                  or _url(pod.manifest.lineage.get("source")))
        out = {
            "org.opencontainers.image.created": iso(opts.created),
            "org.opencontainers.image.title": pod.name,
            "org.opencontainers.image.version": str(version) if version is not None else pod.digest[7:19],
            "org.opencontainers.image.revision": opts.revision or labels.get("org.opencontainers.image.revision")
            or pod.digest,
            "org.opencontainers.image.source": source or "",
            "dev.modelpod.name": pod.name,
            ANNOTATION_DIGEST: pod.digest,
            "dev.modelpod.runtime": __version__,
        }
        return {k: v for k, v in out.items() if v}

    def _config(self, base: BaseImage, python: Interpreter, layers: Sequence[BuiltLayer],
                annotations: Mapping[str, str], opts: BuildOptions) -> bytes:
        created = iso(opts.created)
        inherited = dict(base.config.get("config") or {})
        ours = {
            "MODELPOD_HOST": "0.0.0.0", "MODELPOD_PORT": str(PORT), "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": PYTHONPATH,
            # Nothing is written at run time; a store, if something asks for one, lands in /tmp.
            "MODELPOD_HOME": "/tmp/modelpod",
            # The image's deps layer is the pod's environment: never build another one in a container.
            "MODELPOD_POD_ENV": "server",
        }
        env = [e for e in inherited.get("Env") or [] if e.partition("=")[0] not in ours]
        env += [f"{k}={v}" for k, v in sorted(ours.items())]
        ports: dict[str, dict[str, Any]] = {f"{PORT}/tcp": {}, **({f"{GRPC_PORT}/tcp": {}} if opts.grpc else {})}
        config = {
            "Env": env,
            "User": USER,
            # `docker run IMAGE [serve flags]` serves the pod; `docker run IMAGE batch ...` scores files.
            "Entrypoint": [python.path, "-m", "modelpod.entry", f"/{POD_DIR}"],
            "WorkingDir": f"/{POD_DIR}",
            "ExposedPorts": ports,
            # The one writable place: an anonymous volume, so `docker run --read-only` works as is
            # (torch.export and others need a temporary directory to load).
            "Volumes": {"/tmp": {}},
            "Labels": {**dict(inherited.get("Labels") or {}), **annotations},
            "StopSignal": "SIGTERM",
            # Docker's extension (OCI runtimes ignore it); durations in nanoseconds.
            "Healthcheck": {"Test": ["CMD", python.path, "-c", HEALTH_PROBE], "Interval": 30 * 10**9,
                            "Timeout": 5 * 10**9, "StartPeriod": 30 * 10**9, "Retries": 3},
        }
        history = list(base.config.get("history") or [])
        if sum(1 for h in history if not h.get("empty_layer")) != len(base.layers):
            # Not the base's name: a local path there would make the digest depend on the directory.
            history = [{"created": created, "created_by": "base image layer"} for _ in base.layers]
        history += [{"created": created, "created_by": f"modelpod build: {b.title}", "comment": b.role}
                    for b in layers if b.role != "base"]
        doc = {
            "created": created, "architecture": base.architecture, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]}, "history": history,
        }
        if base.config.get("variant"):
            doc["variant"] = base.config["variant"]
        return to_json(doc)

    # -- outputs --------------------------------------------------------------------------------
    def write_layout(self, built: BuiltImage, directory: Path, tag: str) -> Path:
        return write_layout(directory, built.image, self.blobs, tag)

    def write_docker_archive(self, built: BuiltImage, path: Path, repo_tags: Sequence[str],
                             referrers: Sequence[Image] = ()) -> Path:
        return write_docker_archive(path, built.image, self.blobs, repo_tags, referrers)

    def push(self, built: BuiltImage, ref: Reference, mount_ours: Sequence[str] = ()) -> Transfers:
        """Blobs the registry lacks (mounted from the base's repository when it is the same registry, and
        the modelpod layers from the ``mount_ours`` repositories), then the manifest, last, so a failed
        push never leaves a tag pointing at missing blobs."""
        client = self.registry(ref.host)
        base_ref = built.base.reference
        mount = [base_ref.repository] if base_ref is not None and base_ref.host == ref.host else []
        for layer in built.layers:
            d = layer.descriptor
            client.push_blob(ref.repository, d, self.blobs.path(d.digest),
                             mount_from=[*mount, *mount_ours] if layer.role == "base" else mount_ours,
                             label=f"push {layer.title}")
        config = built.image.config
        client.push_blob(ref.repository, config, self.blobs.path(config.digest), label="push config")
        client.put_manifest(ref.repository, ref.tag or "latest", built.image.manifest, built.image.media_type)
        return client.transfers


def base_annotations(base: BaseImage, python: Interpreter) -> dict[str, str]:
    """What the image says about its base: name, digest, how many of its layers are the base's (``rebase``
    swaps those), and the CPython minor the modelpod layers were built for."""
    out = {ANNOTATION_BASE_LAYERS: str(len(base.layers)), ANNOTATION_PYTHON: python.version}
    if base.reference is not None:
        out["org.opencontainers.image.base.name"] = str(base.reference.with_tag(base.reference.tag or "latest"))
    if base.digest:
        out["org.opencontainers.image.base.digest"] = base.digest
    return out


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _url(value: object) -> str | None:
    # A local path in the lineage would make the image differ per machine: only URLs are kept.
    text = str(value or "")
    return text if text.startswith(("https://", "http://", "git+")) else None


def _epoch(text: str | None) -> int:
    if not text:
        return 0
    try:
        return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        return 0
