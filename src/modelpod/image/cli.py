"""``modelpod build`` / ``push`` / ``pull``: the edge where environment and credentials are read."""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelpod.cli import _emit
from modelpod.errors import RegistryError, UsageError
from modelpod.image.artifact import pull_pod, push_pod
from modelpod.image.base import default_base
from modelpod.image.builder import BuildOptions, BuiltImage, ImageBuilder
from modelpod.image.oci import BlobStore
from modelpod.image.progress import Progress, RichProgress, Silent
from modelpod.image.registry import DOCKER_HUB, Credentials, Reference, Registry
from modelpod.pod import SIGNATURES_NAME, Manifest
from modelpod.settings import Settings
from modelpod.store import Store
from modelpod.trust.policy import TrustPolicy


def credentials_for(host: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """``MODELPOD_REGISTRY_USERNAME``/``_PASSWORD``, else the ``docker login`` entry for ``host``."""
    env = os.environ if env is None else env
    user = env.get("MODELPOD_REGISTRY_USERNAME")
    if user:
        return Credentials(user, env.get("MODELPOD_REGISTRY_PASSWORD", ""))
    config_dir = Path(env.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        auths = json.loads((config_dir / "config.json").read_text()).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    names = {host, f"https://{host}", f"http://{host}"}
    if host in (DOCKER_HUB, "registry-1.docker.io"):
        names |= {"https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB}
    for name, entry in auths.items():
        if name.rstrip("/") in names or name in names:
            try:
                user, _, password = base64.b64decode(entry.get("auth", "")).decode().partition(":")
            except (ValueError, AttributeError):
                continue
            if user:
                return Credentials(user, password)
    return None


def _registries(progress: Progress, env: Mapping[str, str] | None = None) -> Callable[[str], Registry]:
    made: dict[str, Registry] = {}

    def factory(host: str) -> Registry:
        if host not in made:
            made[host] = Registry(host, credentials=credentials_for(host, env), progress=progress)
        return made[host]

    return factory


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Progress]:
    if getattr(args, "json", False):
        yield Silent()
        return
    try:
        bars = RichProgress()
    except ImportError:  # no rich (as in an image): no bars
        yield Silent()
        return
    with bars:
        yield bars


def _source_date_epoch(env: Mapping[str, str] | None = None, manifest: Manifest | None = None,
                       stored: float | None = None) -> int:
    """The image's time: SOURCE_DATE_EPOCH, else when the pod was packed (recorded in its lineage,
    so the same pod gives the same image anywhere), else when the store took it in."""
    raw = (os.environ if env is None else env).get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        packed = manifest.lineage.get("created") if manifest is not None else None
        if isinstance(packed, int) and not isinstance(packed, bool) and packed >= 0:
            return packed
        return int(stored or 0)
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH must be an integer, got {raw!r}") from None


def _output(spec: str | None, name: str, version: int) -> tuple[str, Path, str | None]:
    """(kind, path, tag) from ``oci:DIR[:TAG]`` or ``docker-archive:FILE``."""
    if spec is None:
        return "docker-archive", Path(f"{name}-{version}.tar"), None
    if spec.startswith("oci:"):
        value = spec[4:]
        if ":" in value.rsplit("/", 1)[-1] and not Path(value).is_dir():
            directory, _, tag = value.rpartition(":")
            return "oci", Path(directory), tag
        return "oci", Path(value), None
    if spec.startswith("docker-archive:"):
        return "docker-archive", Path(spec.removeprefix("docker-archive:")), None
    raise UsageError(f"--output {spec!r}: use oci:DIR[:TAG] or docker-archive:FILE")


def build_command(args: argparse.Namespace, settings: Settings) -> Any:
    store = Store(settings.home)
    rec = store.get(args.ref)
    pod = store.open(rec.ref)
    push = Reference.parse(args.push) if args.push else None
    kind, out, out_tag = _output(args.output, rec.name, rec.version) if args.output or not push else ("", Path(), None)
    # A signed or encrypted pod's image verifies / decrypts at load: it needs the trust packages, and
    # an encrypted pod cannot be load-checked without its key (which never enters a build).
    encrypted = bool(pod.manifest.encryption)
    trust = ("trust",) if encrypted or (pod.path / SIGNATURES_NAME).is_file() else ()
    options = BuildOptions(base=args.base, created=_source_date_epoch(None, pod.manifest, rec.created),
                           mtime=_source_date_epoch(None, None, 0),
                           source=getattr(args, "source", None), revision=getattr(args, "revision", None),
                           grpc=not getattr(args, "no_grpc", False),
                           check=not getattr(args, "no_check", False) and not encrypted,
                           features=tuple(sorted({*(getattr(args, "with_", None) or ()), *trust})))
    tag = getattr(args, "tag", None) or f"modelpod/{rec.name}:{rec.version}"
    with _progress(args) as progress:
        builder = ImageBuilder(settings.home / "cache", _registries(progress), progress)
        try:
            built = builder.build(pod, rec.version, options, rec.aliases)
            if encrypted and options.check is False and not getattr(args, "no_check", False):
                built = dataclasses.replace(built, load_check="off (encrypted weights: the key never enters a build)")
        except RegistryError as exc:
            if args.base:
                raise
            raise RegistryError(f"{exc}\nhint: without --base the image starts from {default_base(pod.manifest.python)}"
                                " on Docker Hub; pass a base you have: --base oci:DIR[:TAG] (an OCI layout), "
                                "--base docker-archive:FILE (docker save), or REGISTRY/REPO:TAG") from None
        target = (push if push.tag else push.with_tag(str(rec.version))) if push is not None else None
        outputs = write_outputs(builder, built, args, kind=kind, out=out, out_tag=out_tag or str(rec.version),
                                tag=tag, push=target)
    data = {**built.to_dict(), "pod": rec.ref, "pod_digest": pod.digest, "outputs": outputs}
    _emit(args, data, lambda: _print_build(built, outputs))


def write_outputs(builder: ImageBuilder, built: BuiltImage, args: argparse.Namespace, *, kind: str, out: Path,
                  out_tag: str, tag: str, push: Reference | None, mount_ours: Sequence[str] = ()) -> dict[str, Any]:
    """Write the image where asked, its SBOM and signature beside it (as referrers), ``--sbom FILE``."""
    from modelpod.image.trust_cli import extras

    payloads, outputs = extras(builder, built, args, str(push or tag))
    if kind == "oci":
        builder.write_layout(built, out, out_tag)
        outputs["oci"] = f"{out}:{out_tag}"
        if payloads:
            from modelpod.image.attach import to_layout

            outputs["referrers"] = to_layout(out, built.image.descriptor(), payloads, builder.blobs)
    elif kind == "docker-archive":
        from modelpod.image.attach import artifact

        made = [artifact(built.image.descriptor(), p, builder.blobs) for p in payloads]
        builder.write_docker_archive(built, out, [tag], made)
        outputs["docker-archive"] = str(out)
        outputs["tag"] = tag
        if made:
            outputs["referrers"] = [m.digest for m in made]
    if push is not None:
        transfers = builder.push(built, push, mount_ours)
        outputs["pushed"] = f"{push}@{built.digest}"
        outputs["transfers"] = transfers.to_dict()
        if payloads:
            from modelpod.image.attach import to_registry

            attached = to_registry(builder.registry(push.host), push.repository, built.image.descriptor(),
                                   payloads, builder.blobs)
            outputs["attached"] = [a.to_dict() for a in attached]
    return outputs


def _print_build(built: BuiltImage, outputs: Mapping[str, Any]) -> None:
    from modelpod.cli import print_table

    print_table(("ROLE", "LAYER", "SIZE", "DIGEST", ""),
                [(layer.role, layer.title, _size(layer.descriptor.size), layer.descriptor.digest[:19],
                  "cached" if layer.cached else "") for layer in built.layers])
    print(f"image {built.digest}  (python {built.interpreter.path}, base {built.base.name})")
    print(f"load check: {built.load_check}")
    for key in ("oci", "docker-archive", "pushed", "sbom", "signed"):
        if key in outputs:
            print(f"{key}: {outputs[key]}")
    if "docker-archive" in outputs:
        print(f"load it with: docker load -i {outputs['docker-archive']}")


def push_command(args: argparse.Namespace, settings: Settings) -> Any:
    store = Store(settings.home)
    rec = store.get(args.ref)
    pod = store.open(rec.ref)
    target = Reference.parse(args.target)
    with _progress(args) as progress:
        client = _registries(progress)(target.host)
        pushed = push_pod(pod, rec.version, target, client, BlobStore(settings.home / "cache" / "blobs"))
    data = {**pushed.to_dict(), "pod": rec.ref, "pod_digest": pod.digest}
    t = pushed.transfers
    _emit(args, data, lambda: print(
        f"pushed {rec.ref} to {pushed.reference}  {pushed.digest}  "
        f"({t.uploaded} uploaded, {t.mounted} mounted, {t.existing} already there)"))


def pull_command(args: argparse.Namespace, settings: Settings) -> Any:
    source = Reference.parse(args.source)
    with _progress(args) as progress:
        client = _registries(progress)(source.host)
        rec = pull_pod(source, client, Store(settings.home), TrustPolicy.from_settings(settings))
    data = {"name": rec.name, "version": rec.version, "digest": rec.digest, "source": str(source),
            "transfers": client.transfers.to_dict()}
    _emit(args, data, lambda: print(f"pulled {source} as {rec.ref}  {rec.digest}"))


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
