"""``modelpod rebase``: a built image's modelpod layers on a new base, byte for byte, with no rebuild.

The image says which of its layers are the base's (annotation ``dev.modelpod.base.layers``, else
its history: modelpod's layers are the ``modelpod build:`` entries at the top) and which CPython
minor its layers were built for (``dev.modelpod.python``, else the entrypoint's interpreter). The
new base must have that CPython, the same architecture and a glibc no older than the old base's
(the wheels were chosen for it). Config and manifest are made the way ``build`` makes them, so
rebasing onto B gives the image that building on B gives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modelpod.errors import ImageError
from modelpod.image.base import BaseImage, find_python, load_base
from modelpod.image.builder import (
    ANNOTATION_BASE_LAYERS,
    ANNOTATION_PYTHON,
    GRPC_PORT,
    BuildOptions,
    BuiltImage,
    BuiltLayer,
    ImageBuilder,
    _epoch,
    base_annotations,
)
from modelpod.image.oci import read_layout
from modelpod.image.registry import Reference, Registry

_BUILD_STEP = "modelpod build: "
_BASE_KEYS = ("org.opencontainers.image.base.name", "org.opencontainers.image.base.digest",
              ANNOTATION_BASE_LAYERS, ANNOTATION_PYTHON)
_OURS = ("org.opencontainers.image.created", "org.opencontainers.image.title", "org.opencontainers.image.version",
         "org.opencontainers.image.revision", "org.opencontainers.image.source")


@dataclass(frozen=True)
class SourceImage:
    """A modelpod-built image, read whole into the blob cache, split into base and modelpod layers."""

    image: BaseImage  # the whole image (config + every layer)
    annotations: dict[str, str]  # its manifest annotations (from the config's labels for a docker archive)
    base_count: int
    python: str  # "3.11"
    layers: tuple[BuiltLayer, ...]  # the modelpod layers

    @property
    def old_base(self) -> BaseImage:
        config = {**self.image.config, "rootfs": {"type": "layers", "diff_ids": self.diff_ids[:self.base_count]}}
        return BaseImage(f"the base of {self.image.name}", None, None, config, self.image.layers[:self.base_count])

    @property
    def diff_ids(self) -> list[str]:
        return list((self.image.config.get("rootfs") or {}).get("diff_ids") or [])


def read_source(spec: str, builder: ImageBuilder, registry: Callable[[str], Registry]) -> SourceImage:
    """The image named by ``spec`` (a reference, ``oci:DIR[:TAG]`` or ``docker-archive:FILE``)."""
    image = load_base(spec, builder.blobs, registry)
    config = image.config
    labels: dict[str, str] = dict((config.get("config") or {}).get("Labels") or {})
    annotations = _manifest_annotations(spec, registry)
    if annotations is None:  # a docker archive keeps no manifest: our annotations are also labels
        annotations = {k: v for k, v in labels.items()
                       if k in _OURS or k in _BASE_KEYS or k.startswith("dev.modelpod.")}
    if "dev.modelpod.digest" not in annotations:
        raise ImageError(f"{spec} was not built by modelpod (no dev.modelpod.digest annotation); rebase swaps "
                         "the base of modelpod images only")
    history = [h for h in config.get("history") or [] if not h.get("empty_layer")]
    ours_in_history = 0
    for h in reversed(history):
        if not str(h.get("created_by", "")).startswith(_BUILD_STEP):
            break
        ours_in_history += 1
    count_text = annotations.get(ANNOTATION_BASE_LAYERS) or labels.get(ANNOTATION_BASE_LAYERS)
    total = len(image.layers)
    base_count = int(count_text) if count_text and count_text.isdigit() else total - ours_in_history
    if not 0 < base_count < total:
        raise ImageError(f"{spec}: cannot tell its base layers from modelpod's ({base_count} of {total})")
    python = annotations.get(ANNOTATION_PYTHON) or _entrypoint_python(config)
    if not python:
        raise ImageError(f"{spec}: cannot tell which CPython its layers were built for")
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    steps = history[-(total - base_count):] if len(history) >= total - base_count else []
    layers = []
    for i, desc in enumerate(image.layers[base_count:]):
        step = steps[i] if steps else {}
        title = str(step.get("created_by", "")).removeprefix(_BUILD_STEP) or f"layer {base_count + i + 1}"
        layers.append(BuiltLayer(str(step.get("comment") or "modelpod"), title, desc, diff_ids[base_count + i],
                                 cached=True))
    return SourceImage(image, annotations, base_count, python, tuple(layers))


def _manifest_annotations(spec: str, registry: Callable[[str], Registry]) -> dict[str, str] | None:
    if spec.startswith("docker-archive:"):
        return None
    if spec.startswith("oci:"):
        from modelpod.image.base import _split_layout

        directory, tag = _split_layout(spec[4:])
        data, _ = read_layout(directory, tag)
    else:
        ref = Reference.parse(spec.removeprefix("docker://"))
        client = registry(ref.host)
        data, media = client.get_manifest(ref.repository, ref.reference)
        doc = json.loads(data)
        if doc.get("manifests"):
            from modelpod.image.oci import pick_platform

            data, _ = client.get_manifest(ref.repository, pick_platform(doc).digest)
    return {str(k): str(v) for k, v in (json.loads(data).get("annotations") or {}).items()}


def _entrypoint_python(config: Mapping[str, Any]) -> str | None:
    entry = (config.get("config") or {}).get("Entrypoint") or []
    m = re.search(r"python(3\.\d+)$", str(entry[0])) if entry else None
    return m.group(1) if m else None


def rebase(source: SourceImage, new_base_spec: str, builder: ImageBuilder) -> BuiltImage:
    """``source``'s modelpod layers on ``new_base_spec``: a new config and manifest, no layer rebuilt."""
    name = source.image.name
    new_base = load_base(new_base_spec, builder.blobs, builder.registry, arch=source.image.architecture)
    if new_base.architecture != source.image.architecture:
        raise ImageError(f"cannot rebase {name} onto {new_base_spec}: it is {new_base.architecture}, "
                         f"the image is {source.image.architecture}")
    try:
        python = find_python(new_base, builder.blobs, source.python, builder.cache / "bases")
    except ImageError as exc:
        raise ImageError(f"cannot rebase {name} onto {new_base_spec}: the image's layers are built for CPython "
                         f"{source.python} and must keep it ({exc})") from None
    old = find_python(source.old_base, builder.blobs, source.python, builder.cache / "bases")
    if old.glibc and python.glibc and python.glibc < old.glibc:
        raise ImageError(f"cannot rebase {name} onto {new_base_spec}: its glibc {'.'.join(map(str, python.glibc))} "
                         f"is older than {'.'.join(map(str, old.glibc))}, which the image's wheels were chosen for")
    annotations = {k: v for k, v in source.annotations.items() if k not in _BASE_KEYS}
    annotations |= base_annotations(new_base, python)
    ports = (source.image.config.get("config") or {}).get("ExposedPorts") or {}
    opts = BuildOptions(created=_epoch(str(source.image.config.get("created") or "")),
                        grpc=f"{GRPC_PORT}/tcp" in ports)
    return builder.assemble(new_base, python, source.layers, annotations, opts, load_check="kept (rebase)")

