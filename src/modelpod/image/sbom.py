"""A CycloneDX 1.6 JSON SBOM of an image, made with ``cyclonedx-python-lib`` from what the layers hold.

Components: every Python distribution in the runtime and deps layers (purl ``pkg:pypi/NAME@VERSION``,
license from its metadata, SHA-256 of the wheel it came from, else of its RECORD file, which lists
the sha256 of every file it installed), every Debian package of the base's dpkg status (purl
``pkg:deb/<os-release ID>/NAME@VERSION?arch=…&distro=…``), the base OS, the pod as a
``machine-learning-model`` and each pod file with its SHA-256. Same image, same document: the serial
number is derived from the image digest and the timestamp is the image's creation time.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from modelpod import __version__
from modelpod.errors import ImageError, MissingExtraError
from modelpod.image.contents import ImageContents

MEDIA_TYPE = "application/vnd.cyclonedx+json"
SPEC_VERSION = "1.6"


def make_sbom(contents: ImageContents, *, image_digest: str, name: str, created: int = 0,
              base: str | None = None) -> bytes:
    """The SBOM JSON of an image (validated against the CycloneDX 1.6 schema before it is returned)."""
    try:
        from cyclonedx.contrib.license.factories import LicenseFactory
        from cyclonedx.model import HashAlgorithm, HashType, Property
        from cyclonedx.model.bom import Bom, BomMetaData
        from cyclonedx.model.component import Component, ComponentType
        from cyclonedx.model.tool import ToolRepository
        from cyclonedx.output.json import JsonV1Dot6
        from packageurl import PackageURL
    except ImportError:
        raise MissingExtraError("sbom", "cyclonedx-python-lib", "the image SBOM") from None

    licenses = LicenseFactory()

    def sha256(hexdigest: str | None) -> list[HashType]:
        return [HashType(alg=HashAlgorithm.SHA_256, content=hexdigest)] if hexdigest else []

    def props(**values: str | None) -> list[Property]:
        return [Property(name=f"modelpod:{k.replace('_', '-')}", value=v) for k, v in values.items() if v]

    components: list[Component] = []
    for d in contents.python:
        layer = "runtime" if d.site.endswith("/runtime") else "deps"
        components.append(Component(
            type=ComponentType.LIBRARY, name=d.name, version=d.version,
            bom_ref=f"pypi:{layer}:{d.name.lower()}@{d.version}",
            purl=PackageURL("pypi", None, d.name.lower().replace("_", "-"), d.version),
            licenses=[licenses.make_from_string(d.license)] if d.license else None,
            hashes=sha256(d.wheel_sha256 or d.record_sha256),
            properties=props(layer=layer, site=d.site, layer_digest=d.layer, wheel=d.wheel,
                             hash_of="wheel" if d.wheel_sha256 else ("RECORD" if d.record_sha256 else None)),
        ))
    distro = contents.os_release.get("ID") or "debian"
    distro_q = f"{distro}-{contents.os_release['VERSION_ID']}" if contents.os_release.get("VERSION_ID") else None
    if contents.os_release:
        components.append(Component(
            type=ComponentType.OPERATING_SYSTEM, name=distro, bom_ref=f"os:{distro}",
            version=contents.os_release.get("VERSION_ID") or contents.os_release.get("VERSION_CODENAME"),
            description=contents.os_release.get("PRETTY_NAME"), properties=props(layer="base"),
        ))
    for p in contents.debian:
        qualifiers = {k: v for k, v in (("arch", p.architecture), ("distro", distro_q)) if v}
        components.append(Component(
            type=ComponentType.LIBRARY, name=p.name, version=p.version,
            bom_ref=f"deb:{p.name}:{p.architecture}@{p.version}",
            purl=PackageURL("deb", distro, p.name, p.version, qualifiers or None),
            publisher=p.maintainer, properties=props(layer="base", source_package=p.source),
        ))
    manifest = contents.manifest
    if manifest is not None:
        components.append(Component(
            type=ComponentType.MACHINE_LEARNING_MODEL, name=manifest.name, bom_ref=f"pod:{manifest.digest}",
            version=manifest.digest, description=f"{manifest.framework} model packed by modelpod",
            properties=props(framework=manifest.framework, python=manifest.python or None),
        ))
    for f in contents.pod_files:
        components.append(Component(
            type=ComponentType.FILE, name=f.path, bom_ref=f"file:{f.path}", hashes=sha256(f.sha256),
            properties=props(role=f.role, size=str(f.size), path=f"/opt/modelpod/pod/{f.path}"),
        ))
    root = Component(type=ComponentType.CONTAINER, name=name, version=image_digest, bom_ref=image_digest,
                     properties=props(base=base))
    tool = Component(type=ComponentType.APPLICATION, name="modelpod", version=__version__)
    bom = Bom(
        serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"modelpod:sbom:{image_digest}"),
        metadata=BomMetaData(component=root, tools=ToolRepository(components=[tool]),
                             timestamp=datetime.fromtimestamp(created, tz=timezone.utc)),
        components=components,
    )
    bom.register_dependency(root, components)
    text = JsonV1Dot6(bom).output_as_string(indent=None)
    problem = validate(text)
    if problem:
        raise ImageError(f"the SBOM made for {name} does not validate against CycloneDX {SPEC_VERSION}: {problem}")
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")).encode()


def validate(text: str | bytes) -> str | None:
    """None when ``text`` is a valid CycloneDX 1.6 JSON document, else the first error, briefly."""
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError:
        raise MissingExtraError("sbom", "cyclonedx-python-lib", "validating an SBOM") from None
    data = text.decode("utf-8") if isinstance(text, bytes) else text
    try:
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(data)
    except ValueError as exc:
        return f"not JSON: {exc}"
    if error is None:
        return None
    detail = getattr(error, "data", None)
    return str(getattr(detail, "message", None) or error)[:500]


def summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Counts and the headline facts of an SBOM document (any CycloneDX JSON)."""
    comps = list(doc.get("components") or [])

    def of(kind: str) -> list[dict[str, Any]]:
        return [c for c in comps if str(c.get("purl", "")).startswith(f"pkg:{kind}/")]

    root = (doc.get("metadata") or {}).get("component") or {}
    layers: dict[str, int] = {}
    for c in of("pypi"):
        layer = _prop(c, "modelpod:layer") or "?"
        layers[layer] = layers.get(layer, 0) + 1
    os_ = next((c for c in comps if c.get("type") == "operating-system"), None)
    return {
        "spec_version": doc.get("specVersion"), "serial_number": doc.get("serialNumber"),
        "image": root.get("name"), "digest": root.get("version"),
        "python_packages": len(of("pypi")), "python_by_layer": layers,
        "debian_packages": len(of("deb")),
        "os": f"{os_.get('name')} {os_.get('version') or ''}".strip() if os_ else None,
        "models": [{"name": c.get("name"), "digest": c.get("version")} for c in comps
                   if c.get("type") == "machine-learning-model"],
        "files": [{"path": c.get("name"), "sha256": _sha(c), "role": _prop(c, "modelpod:role")}
                  for c in comps if c.get("type") == "file"],
    }


def _prop(component: Mapping[str, Any], name: str) -> str | None:
    for p in component.get("properties") or ():
        if p.get("name") == name:
            return str(p.get("value"))
    return None


def _sha(component: Mapping[str, Any]) -> str | None:
    for h in component.get("hashes") or ():
        if h.get("alg") == "SHA-256":
            return str(h.get("content"))
    return None
