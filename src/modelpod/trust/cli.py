"""``modelpod sign``, ``verify --signature`` and ``encrypt``: the trust commands' edge."""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelpod.errors import BadSignatureError, TrustError, UntrustedSignerError, UsageError
from modelpod.pod import Pod
from modelpod.settings import Settings
from modelpod.store import Store, is_path
from modelpod.trust.policy import TrustPolicy, add_signatures, read_signatures


def _open(ref: str, settings: Settings, verify: bool = True) -> tuple[Pod, str]:
    """The pod (store reference or directory) and how to name it in messages."""
    from modelpod.api import open_pod

    pod = open_pod(ref, settings=settings, verify=verify)
    if is_path(ref):
        return pod, f"pod {pod.name} ({ref})"
    return pod, f"pod {Store(settings.home).get(ref).ref}"


def sign_command(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.cli import _emit
    from modelpod.trust.signing import inspect, sign_digest

    pod, what = _open(args.ref, settings)
    bundle = sign_digest(pod.digest, Path(args.key).expanduser(), name=pod.name,
                         chain=Path(args.cert).expanduser() if args.cert else None)
    path = add_signatures(pod.path, [bundle])
    if args.output:
        Path(args.output).write_bytes(bundle)
    signer = inspect(bundle)
    data = {"ref": args.ref, "digest": pod.digest, "signatures": len(read_signatures(pod.path)),
            "stored": str(path), **{k: v for k, v in signer.to_dict().items() if k in (
                "keyid", "algorithm", "certificate", "signed_at")}}
    _emit(args, data, lambda: print(f"signed {what}  {pod.digest}  by {signer.certificate or signer.keyid} "
                                    f"({signer.algorithm})"))


def verify_signatures(args: argparse.Namespace, settings: Settings) -> int:
    """``modelpod verify REF --signature [--key PUB.pem]``: files re-hashed, then who signed what."""
    from modelpod.cli import _emit
    from modelpod.trust.keys import load_trusted
    from modelpod.trust.signing import inspect, verify

    pod, what = _open(args.ref, settings, verify=False)
    problems = list(pod.problems())
    if args.key:
        keys, source = load_trusted([Path(k).expanduser() for k in args.key]), "--key"
    else:
        policy = TrustPolicy.from_settings(settings)
        keys, source = (policy.trusted if policy.keys else []), policy.source
    reports: list[dict[str, Any]] = []
    for bundle in read_signatures(pod.path):
        try:
            reports.append({**verify(bundle, pod.digest, keys).to_dict(), "error": None})
        except (BadSignatureError, UntrustedSignerError) as exc:
            try:
                seen: dict[str, Any] = inspect(bundle).to_dict()
            except TrustError:
                seen = {}
            reports.append({**seen, "trusted": False, "error": str(exc)})
    trusted = [r for r in reports if r.get("trusted")]
    reason = ("files do not match the manifest" if problems else
              "not signed" if not reports else
              "no trusted keys (pass --key PUB.pem or set trust.keys / MODELPOD_TRUST_KEYS)" if not keys else
              "no signature by a trusted key" if not trusted else None)
    data = {"ref": args.ref, "digest": pod.digest, "name": pod.name, "ok": reason is None, "reason": reason,
            "keys": source, "files": len(pod.manifest.files), "signatures": reports,
            "problems": [{"path": p, "message": m} for p, m in problems]}

    def human() -> None:
        for _, message in problems:
            print(f"FAIL {message}", file=sys.stderr)
        for r in reports:
            who = r.get("certificate") or r.get("keyid") or "?"
            if r.get("trusted"):
                print(f"ok   {what} {r['digest']} signed by {who} ({r['algorithm']}) at {r['signed_at']}, "
                      f"trusted by {r['trusted_by']}")
            else:
                print(f"FAIL {what}: signature by {who}: {r['error']}", file=sys.stderr)
        if reason is not None:
            print(f"FAIL {what} {pod.digest}: {reason}", file=sys.stderr)

    _emit(args, data, human)
    return 0 if reason is None else 3


def encrypt_command(args: argparse.Namespace, settings: Settings) -> Any:
    """``modelpod encrypt REF --key KEYFILE``: a new version with the weights AES-256-GCM encrypted."""
    from modelpod.cli import _emit
    from modelpod.trust.encryption import encrypt_dir, read_key

    key = read_key(args.key)
    store = Store(settings.home)
    rec = store.get(args.ref)
    pod = store.open(rec.ref)
    staging = store.staging()
    try:
        for entry in pod.manifest.files:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pod.path / entry.path, target)
        lineage = {**dict(pod.manifest.lineage), "parent": pod.digest}
        manifest = encrypt_dir(staging, replace(pod.manifest, lineage=lineage), key)
        new = store.add(staging, manifest)
    finally:
        store.discard(staging)
    encrypted = sorted(manifest.encryption.get("files") or {})
    data = {"name": new.name, "version": new.version, "digest": new.digest, "from": rec.ref,
            "key_id": manifest.encryption["key_id"], "encrypted": encrypted}
    _emit(args, data, lambda: print(
        f"encrypted {rec.ref} as {new.ref}  {new.digest}  ({len(encrypted)} weights files, key id "
        f"{manifest.encryption['key_id']})\nthe plaintext version {rec.ref} is still in the store: "
        f"remove it with `modelpod rm {rec.ref}` before sharing the store"))


def add_arguments(sub: Any, cmd: Any) -> None:
    """The ``sign`` and ``encrypt`` subcommands (``cmd(name, help)`` makes one with ``--json``)."""
    c = cmd("sign", "sign a pod's digest (DSSE + in-toto) with an ECDSA P-256 or Ed25519 key")
    c.add_argument("ref", help="NAME[:VERSION|@ALIAS] or a pod directory")
    c.add_argument("--key", required=True, metavar="KEY.pem", help="private key (PEM): P-256 or Ed25519")
    c.add_argument("--cert", metavar="CHAIN.pem", help="the key's certificate, then its intermediates (PEM)")
    c.add_argument("-o", "--output", metavar="FILE", help="also write the signature bundle to FILE")
    c = cmd("encrypt", "store a new version of a pod with its weights AES-256-GCM encrypted")
    c.add_argument("ref")
    c.add_argument("--key", required=True, metavar="KEYFILE", help="32-byte AES key file (openssl rand -out k 32)")


def check_key_flags(args: argparse.Namespace) -> None:
    if getattr(args, "key", None) and not getattr(args, "signature", False):
        raise UsageError("verify --key is for --signature: modelpod verify REF --signature --key PUB.pem")
