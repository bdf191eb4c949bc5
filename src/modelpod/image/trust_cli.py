"""The image's SBOM and signature at the command line: ``build --sbom/--sign-key``, ``modelpod sbom``,
``modelpod verify IMAGE --key``, ``modelpod rebase``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpod.errors import BadSignatureError, ImageError, MissingExtraError, NotSignedError, TrustError, UsageError
from modelpod.image.attach import SBOM_TYPE, Payload
from modelpod.image.oci import Descriptor
from modelpod.image.registry import Reference
from modelpod.settings import Settings

if TYPE_CHECKING:  # the builder needs packaging, which images lack: `modelpod serve` there parses these args
    from modelpod.image.builder import BuiltImage, ImageBuilder

SIGNATURE_TITLE = "signature.json"
SBOM_TITLE = "sbom.cdx.json"


def is_image_ref(ref: str) -> bool:
    """An image (``oci:DIR``, ``docker-archive:FILE``, ``registry.host/repo[:tag]``), not a pod ref or directory."""
    if ref.startswith(("oci:", "docker-archive:", "docker://")):
        return True
    first, slash, _ = ref.partition("/")
    return bool(slash) and not Path(ref).exists() and ("." in first or ":" in first or first == "localhost")


def extras(builder: ImageBuilder, built: BuiltImage, args: argparse.Namespace,
           name: str) -> tuple[list[Payload], dict[str, Any]]:
    """The SBOM (unless --no-sbom) and, with --sign-key, the signature of ``built``, to attach beside it."""
    payloads: list[Payload] = []
    outputs: dict[str, Any] = {}
    sbom_file = getattr(args, "sbom", None)
    if not getattr(args, "no_sbom", False):
        try:
            data = builder.sbom(built)
        except MissingExtraError as exc:
            if sbom_file:
                raise
            outputs["sbom"] = f"skipped: {exc}"
        else:
            payloads.append(Payload(SBOM_TYPE, data, SBOM_TITLE))
            outputs["sbom"] = "attached"
            if sbom_file:
                Path(sbom_file).parent.mkdir(parents=True, exist_ok=True)
                Path(sbom_file).write_bytes(data)
                outputs["sbom"] = str(sbom_file)
    elif sbom_file:
        raise UsageError("--sbom FILE and --no-sbom contradict each other")
    key = getattr(args, "sign_key", None)
    if key:
        from modelpod.trust.signing import BUNDLE_MEDIA_TYPE, sign_digest

        bundle = sign_digest(built.digest, Path(key), name=name, kind="image",
                             chain=Path(args.sign_cert) if getattr(args, "sign_cert", None) else None)
        payloads.append(Payload(BUNDLE_MEDIA_TYPE, bundle, SIGNATURE_TITLE))
        outputs["signed"] = built.digest
    return payloads, outputs


def attach_sbom(builder: ImageBuilder, built: BuiltImage, ref: Reference) -> bool:
    """The SBOM of a pushed image attached beside it (skipped without the sbom extra)."""
    from modelpod.image.attach import to_registry

    try:
        data = builder.sbom(built)
    except MissingExtraError:
        return False
    to_registry(builder.registry(ref.host), ref.repository, built.image.descriptor(),
                [Payload(SBOM_TYPE, data, SBOM_TITLE)], builder.blobs)
    return True


def add_build_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--sbom", metavar="FILE", help="also write the image's CycloneDX 1.6 JSON SBOM here "
                   "(it is attached to the image as an OCI referrer either way)")
    c.add_argument("--no-sbom", action="store_true", help="make no SBOM")
    c.add_argument("--sign-key", metavar="KEY.pem", help="sign the image manifest digest (ECDSA P-256 or Ed25519 "
                   "private key); the signature is attached as an OCI referrer")
    c.add_argument("--sign-cert", metavar="CHAIN.pem", help="with --sign-key: the signer's certificate chain")


def add_arguments(sub: Any, cmd: Any) -> None:
    """``modelpod sbom`` and ``modelpod rebase``; ``cmd(name, help)`` makes a subparser with --json."""
    c = cmd("sbom", "print the SBOM attached to an image (registry ref, oci:DIR[:TAG] or docker-archive:FILE)")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("-o", "--output", metavar="FILE", help="write the SBOM document to FILE")
    c.add_argument("--generate", action="store_true",
                   help="make it from the image's layers when none is attached (a `docker save` archive)")
    c = cmd("rebase", "swap a modelpod image's base layers for a new base, keeping every modelpod layer")
    c.add_argument("image", metavar="IMAGE", help="registry ref, oci:DIR[:TAG] or docker-archive:FILE")
    c.add_argument("--base", required=True, metavar="NEWBASE",
                   help="registry ref, oci:DIR[:TAG] or docker-archive:FILE")
    c.add_argument("--push", metavar="REGISTRY/REPO[:TAG]")
    c.add_argument("--output", help="oci:DIR[:TAG] or docker-archive:FILE")
    c.add_argument("--tag", metavar="NAME:TAG", help="the name docker load gives the image")
    add_build_arguments(c)


def add_verify_arguments(c: argparse.ArgumentParser) -> None:
    """``modelpod verify IMAGE --key pub.pem``: ``--key`` unless the pod verify already defines it."""
    if "--key" not in c._option_string_actions:
        c.add_argument("--key", action="append", metavar="PUB.pem",
                       help="a trusted public key or CA certificate (repeatable; default $MODELPOD_TRUST_KEYS)")


# -- modelpod sbom ------------------------------------------------------------------------------
def sbom_command(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.cli import _emit
    from modelpod.image.attach import NoIndexError, find
    from modelpod.image.cli import _progress, _registries
    from modelpod.image.sbom import summary, validate

    with _progress(args) as progress:
        from modelpod.image.builder import ImageBuilder

        builder = ImageBuilder(settings.home / "cache", _registries(progress), progress)
        try:
            subject, found = find(args.image, SBOM_TYPE, builder.registry, builder.blobs)
        except NoIndexError:
            if not args.generate:
                raise
            # No manifest: the config digest names the image (what `docker images --digests` lacks).
            subject, found = _config_subject(args.image), []
        generated = False
        if not found:
            if not args.generate:
                raise ImageError(f"{args.image} ({subject.digest[:19]}…) has no SBOM attached; `modelpod sbom "
                                 f"{args.image} --generate` makes one from its layers")
            found, generated = [_generate(args.image, builder, subject.digest)], True
    data = found[-1]
    try:
        doc = json.loads(data)
    except ValueError:
        raise ImageError(f"{args.image}: the attached SBOM is not JSON") from None
    try:
        problem = validate(data)
    except MissingExtraError:
        problem = None
    if args.output:
        Path(args.output).write_bytes(data)
    if getattr(args, "json", False):
        print(data.decode("utf-8"))
        return None
    info = {**summary(doc), "subject": subject.digest, "schema": "invalid: " + problem if problem else "valid",
            "generated": generated}
    _emit(args, info, lambda: _print_summary(info))
    return None


def _print_summary(info: dict[str, Any]) -> None:
    print(f"SBOM CycloneDX {info['spec_version']} of {info['image']} {info['subject']}  (schema {info['schema']}"
          f"{', made from the layers' if info['generated'] else ''})")
    layers = ", ".join(f"{n} in {k}" for k, n in sorted(info["python_by_layer"].items()))
    print(f"python packages: {info['python_packages']}" + (f" ({layers})" if layers else ""))
    print(f"debian packages: {info['debian_packages']}" + (f" ({info['os']})" if info["os"] else ""))
    for m in info["models"]:
        print(f"model: {m['name']} {m['digest']}")
    for f in info["files"]:
        print(f"  {f['role'] or '':8} {f['sha256']}  {f['path']}")


def _config_subject(spec: str) -> Descriptor:
    import tarfile

    from modelpod.image.oci import DOCKER_CONFIG

    with tarfile.open(spec.removeprefix("docker-archive:"), "r:*") as tar:
        fh = tar.extractfile("manifest.json")
        config = str(json.loads(fh.read() if fh else b"[{}]")[0].get("Config", ""))
    hexpart = config.rsplit("/", 1)[-1].removesuffix(".json")
    return Descriptor(DOCKER_CONFIG, f"sha256:{hexpart}", 0)


def _generate(spec: str, builder: ImageBuilder, digest: str) -> bytes:
    from modelpod.image.builder import _epoch
    from modelpod.image.contents import scan
    from modelpod.image.rebase import read_source
    from modelpod.image.sbom import make_sbom

    source = read_source(spec, builder, builder.registry)
    contents = scan(builder.blobs, source.image.layers[:source.base_count], [x.descriptor for x in source.layers],
                    builder.cache / "wheels")
    return make_sbom(contents, image_digest=digest, name=source.annotations.get("org.opencontainers.image.title", spec),
                     created=_epoch(source.annotations.get("org.opencontainers.image.created")))


# -- modelpod verify IMAGE ------------------------------------------------------------------------
def verify_image_command(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.cli import _emit
    from modelpod.image.attach import find
    from modelpod.image.cli import _progress, _registries
    from modelpod.trust.keys import load_trusted
    from modelpod.trust.signing import BUNDLE_MEDIA_TYPE, verify

    sources = getattr(args, "key", None)
    if sources:
        keys = load_trusted([Path(s).expanduser() for s in sources])
    else:
        from modelpod.trust.policy import TrustPolicy

        policy = TrustPolicy.from_settings(settings)
        if not policy.keys:
            raise UsageError("verify IMAGE needs --key PUB.pem (a trusted public key or CA certificate), "
                             "or trust.keys / MODELPOD_TRUST_KEYS")
        keys = policy.trusted
    with _progress(args) as progress:
        from modelpod.image.builder import ImageBuilder

        builder = ImageBuilder(settings.home / "cache", _registries(progress), progress)
        subject, bundles = find(args.ref, BUNDLE_MEDIA_TYPE, builder.registry, builder.blobs)
    if not bundles:
        raise NotSignedError(f"image {args.ref} ({subject.digest}) has no signature attached")
    reasons: list[str] = []
    for bundle in reversed(bundles):  # the newest first
        try:
            signer = verify(bundle, subject.digest, keys, what=f"image {args.ref}")
        except TrustError as exc:
            reasons.append(str(exc))
            continue
        data = {"ref": args.ref, "digest": subject.digest, "ok": True, "signer": signer.to_dict()}
        line = f"ok {args.ref}  {subject.digest}  {signer.describe()}"
        _emit(args, data, lambda text=line: print(text))  # type: ignore[misc]
        return None
    raise BadSignatureError(reasons[0] if len(reasons) == 1 else
                            f"image {args.ref}: none of its {len(reasons)} signatures verifies: " + "; ".join(reasons))


# -- modelpod rebase ----------------------------------------------------------------------------
def rebase_command(args: argparse.Namespace, settings: Settings) -> Any:
    import time

    from modelpod.cli import _emit
    from modelpod.image.cli import _output, _print_build, _progress, _registries, write_outputs
    from modelpod.image.rebase import read_source, rebase
    from modelpod.image.registry import Reference

    if not args.push and not args.output:
        raise UsageError("rebase needs --push REGISTRY/REPO[:TAG] or --output oci:DIR[:TAG]|docker-archive:FILE")
    started = time.monotonic()
    with _progress(args) as progress:
        from modelpod.image.builder import ImageBuilder

        builder = ImageBuilder(settings.home / "cache", _registries(progress), progress)
        source = read_source(args.image, builder, builder.registry)
        built = rebase(source, args.base, builder)
        title = source.annotations.get("org.opencontainers.image.title") or "image"
        version = source.annotations.get("org.opencontainers.image.version") or "rebased"
        push = Reference.parse(args.push) if args.push else None
        if push is not None and not push.tag:
            push = push.with_tag(version)
        kind, out, out_tag = _output(args.output, title, 0) if args.output else ("", Path(), None)
        tag = args.tag or f"modelpod/{title}:{version}"
        src = source.image.reference
        mount = [src.repository] if src is not None and push is not None and src.host == push.host else []
        outputs = write_outputs(builder, built, args, kind=kind, out=out, out_tag=out_tag or version, tag=tag,
                                push=push, mount_ours=mount)
    kept = [layer.descriptor.digest for layer in source.layers]
    data = {**built.to_dict(), "source": args.image, "source_digest": source.image.digest, "new_base": args.base,
            "kept_layers": kept, "seconds": round(time.monotonic() - started, 3), "outputs": outputs}

    def human() -> None:
        _print_build(built, outputs)
        print(f"rebased {args.image} onto {args.base}: {len(kept)} modelpod layers kept byte for byte, "
              f"in {data['seconds']:.1f}s")

    _emit(args, data, human)
    return None
