"""The ``modelpod`` command: parse arguments, call the library, print (``--json`` everywhere)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelpod import __version__
from modelpod.errors import ConflictError, ModelpodError, UsageError
from modelpod.settings import Settings
from modelpod.store import Ref, Store

Handler = Callable[[argparse.Namespace, Settings], Any]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register


def _kv(items: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r}: use KEY=VALUE")
        out[key] = value
    return out


def json_text(data: Any, indent: int | None = None, sort_keys: bool = True) -> str:
    """Valid JSON for any output: NaN and infinities become null (as the REST API writes them)."""
    return json.dumps(_finite(data), indent=indent, sort_keys=sort_keys, default=str, allow_nan=False)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json_text(data))
    else:
        human()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on stdout: rich's where it is installed (not in images), plain columns otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        for line in (headers, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        return
    table = Table(*headers, box=None)
    for row in rows:
        table.add_row(*row)
    Console(highlight=False).print(table)


# -- pods and the store ------------------------------------------------------------------------
@command("pack")
def _pack(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.packing import pack

    store = Store(settings.home)
    options: dict[str, Any] = _kv(args.option, "--option")
    options.update({k: v for k in ("task", "classes", "imgsz") if (v := getattr(args, k, None))})
    rec = pack(
        args.path, args.name, store,
        framework=args.framework, sample=args.sample, requirements=args.requirements,
        labels=_kv(args.label, "--label"), parent=args.parent, allow_pickle=args.allow_pickle, trust=args.trust,
        entrypoint=args.entrypoint, options=options, outputs=args.outputs,
        auto_lock=not args.no_auto_lock, reference=args.reference, encrypt=args.encrypt,
    )
    data = {"name": rec.name, "version": rec.version, "digest": rec.digest, "framework": rec.manifest.framework}
    _emit(args, data, lambda: print(f"packed {rec.name}:{rec.version}  {rec.digest}  ({rec.manifest.framework})"))


@command("list")
def _list(args: argparse.Namespace, settings: Settings) -> Any:
    recs = Store(settings.home).list(args.name)
    data = [r.to_dict() for r in recs]

    def human() -> None:
        print_table(("NAME", "VERSION", "ALIASES", "FRAMEWORK", "SIZE", "DIGEST"),
                    [(r.name, str(r.version), ",".join(r.aliases), r.manifest.framework,
                      _size(r.to_dict()["size"]), r.digest[:19]) for r in recs])

    _emit(args, data, human)


@command("show")
def _show(args: argparse.Namespace, settings: Settings) -> Any:
    rec = Store(settings.home).get(args.ref)
    data = {**rec.to_dict(), "manifest": rec.manifest.to_dict()}

    def human() -> None:
        print(f"{rec.name}:{rec.version}  {rec.digest}")
        if rec.aliases:
            print(f"aliases: {', '.join(rec.aliases)}")
        print(rec.manifest.to_yaml(), end="")

    _emit(args, data, human)


@command("tag")
def _tag(args: argparse.Namespace, settings: Settings) -> Any:
    ref = Ref.parse(args.ref)
    store = Store(settings.home)
    version = ref.version if ref.version is not None else store.get(ref).version
    rec = store.tag(ref.name, version, args.alias)
    _emit(args, rec.to_dict(), lambda: print(f"{rec.name}@{args.alias} -> {rec.name}:{rec.version}"))


@command("rm")
def _rm(args: argparse.Namespace, settings: Settings) -> Any:
    store = Store(settings.home)
    ref = Ref.parse(args.ref)
    if ref.alias and args.alias_only:
        store.untag(ref.name, ref.alias)
        _emit(args, {"untagged": args.ref}, lambda: print(f"untagged {args.ref}"))
        return
    if not args.force:
        # Removing what an alias points at (churn@production) changes what that alias serves: say so first.
        targets = store.list(ref.name) if args.all else [store.get(ref)]
        held = [f"{r.name}@{a} -> {r.ref}" for r in targets for a in r.aliases]
        if held:
            raise ConflictError(f"{', '.join(held)}: an alias points at it; remove the alias (rm --alias "
                                f"NAME@ALIAS), or pass --force to remove the version and its aliases")
    gone = store.remove(args.ref, all_versions=args.all)
    _emit(args, {"removed": [r.ref for r in gone]}, lambda: print("removed " + ", ".join(r.ref for r in gone)))


@command("gc")
def _gc(args: argparse.Namespace, settings: Settings) -> Any:
    rep = Store(settings.home, sweep=False).gc(dry_run=args.dry_run)  # gc sweeps, and reports it
    verb = "would free" if rep.dry_run else "freed"
    _emit(args, rep.to_dict(), lambda: print(
        f"{verb} {_size(rep.freed_bytes)}: {rep.blobs} unreferenced blobs ({_size(rep.blob_bytes)}), "
        f"{rep.pod_dirs} stray pod directories, {rep.staging} staging entries ({_size(rep.staging_bytes)})"))


@command("verify")
def _verify(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.image.trust_cli import is_image_ref, verify_image_command

    if is_image_ref(args.ref):
        return verify_image_command(args, settings)
    from modelpod.api import open_pod
    from modelpod.trust.cli import check_key_flags, verify_signatures

    check_key_flags(args)
    if args.signature:
        return verify_signatures(args, settings)

    pod = open_pod(args.ref, settings=settings, verify=False)
    problems = list(pod.problems())
    data = {"ref": args.ref, "digest": pod.digest, "ok": not problems, "files": len(pod.manifest.files),
            "problems": [{"path": p, "message": m} for p, m in problems]}
    if problems:
        _emit(args, data, lambda: print("\n".join(f"FAIL {m}" for _, m in problems), file=sys.stderr))
        return 3
    _emit(args, data, lambda: print(f"ok {args.ref}  {pod.digest}  ({len(pod.manifest.files)} files verified)"))


@command("export")
def _export(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.archive import export

    pod = Store(settings.home).open(args.ref)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"--output {out}: directory {out.parent} does not exist")
    out = export(pod, out)
    _emit(args, {"path": str(out), "digest": pod.digest}, lambda: print(f"exported {args.ref} to {out}"))


@command("import")
def _import(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.archive import import_archive
    from modelpod.trust.policy import TrustPolicy

    rec = import_archive(Path(args.file), Store(settings.home), name=args.name,
                         policy=TrustPolicy.from_settings(settings))
    data = {"name": rec.name, "version": rec.version, "digest": rec.digest}
    _emit(args, data, lambda: print(f"imported {rec.name}:{rec.version}  {rec.digest}"))


@command("predict")
def _predict(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod import table
    from modelpod.api import load
    from modelpod.packing import sample_inputs
    from modelpod.protocols.codec import decode_request, encode_response
    from modelpod.serving.messages import InferRequest
    from modelpod.serving.worker import ModelWorker

    model = load(args.ref, settings=settings.with_(decrypt_key_file=_path(args.decrypt_key)))
    if args.image:
        from modelpod.vision.cli import predict_images

        print(json_text(predict_images(model, args.image, args.annotate), indent=None if args.json else 2,
                        sort_keys=False))
        return None
    if not args.input:
        raise UsageError("predict needs --input FILE (or --image FILE for a vision pod)")
    path = Path(args.input)
    request: InferRequest
    if path.suffix == ".json":
        try:
            request = decode_request(json.loads(path.read_text()), None, table.input_check(model.signature, model.name))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON: {exc}") from None
    else:  # .npy, .npz, or a table (.csv / .parquet / .jsonl): its columns, or one matrix
        request = InferRequest(sample_inputs(path, model.signature))
    # The server's checks and error mapping: a model error caused by the input is exit 2, no traceback.
    inputs = model.coerce(request.inputs)
    if model.takes_parameters:  # the request's parameters (conf, iou, ...), as the server passes them
        from modelpod.model import with_parameters

        inputs = with_parameters(inputs, request.parameters)
    outputs = ModelWorker(model, model.name).call(inputs)
    body, _ = encode_response(model.name, None, outputs, request)
    print(json_text(body, indent=None if args.json else 2, sort_keys=False))


@command("sign")
def _sign(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.trust.cli import sign_command

    return sign_command(args, settings)


@command("encrypt")
def _encrypt(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.trust.cli import encrypt_command

    return encrypt_command(args, settings)


def _path(text: str | None) -> Path | None:
    return Path(text).expanduser() if text else None


@command("batch")
def _batch(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.batch.cli import batch_command

    return batch_command(args, settings)


# -- serving and images (their modules own the work) ---------------------------------------------
@command("serve")
def _serve(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.serving.server import serve

    return serve(args, settings)


@command("route")
def _route(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.serving.route_cli import route_command

    return route_command(args, settings)


@command("token")
def _token(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.serving.token_cli import token_command

    return token_command(args, settings)


@command("env")
def _env(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.serving.env_cli import env_command

    return env_command(args, settings)


@command("build")
def _build(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.image.cli import build_command

    return build_command(args, settings)


@command("push")
def _push(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.image.cli import push_command

    return push_command(args, settings)


@command("pull")
def _pull(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.image.cli import pull_command

    return pull_command(args, settings)


@command("sbom")
def _sbom(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.image.trust_cli import sbom_command

    return sbom_command(args, settings)


@command("rebase")
def _rebase(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.image.trust_cli import rebase_command

    return rebase_command(args, settings)


@command("deploy")
def _deploy(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.deploy.cli import deploy_command

    return deploy_command(args, settings)


@command("observe")
def _observe(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.observe.cli import observe_command

    return observe_command(args, settings)


@command("drift")
def _drift(args: argparse.Namespace, settings: Settings) -> Any:
    from modelpod.observe.cli import drift_command

    return drift_command(args, settings)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} TB"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelpod", description="Model containers: pack, version, build, serve.")
    p.add_argument("--version", action="version", version=f"modelpod {__version__}")
    p.add_argument("--home", help="store directory (default $MODELPOD_HOME or ~/.modelpod)")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--json", action="store_true", help="print JSON")
        return c

    c = cmd("pack", "pack a model file or directory into a new pod version")
    c.add_argument("path")
    c.add_argument("--name", required=True)
    c.add_argument("--framework")
    c.add_argument("--sample", help="sample input that gives the signature: .npy, .npz, OIP JSON, "
                   "or a table (.csv, .parquet, .jsonl)")
    c.add_argument("--reference", metavar="FILE", help="rows (same formats as --sample) whose feature "
                   "distributions drift is measured against (default: the sample; docs/observe.md)")
    c.add_argument("--outputs", metavar="NAME,...", help="named outputs, e.g. label,probabilities (docs/models.md)")
    c.add_argument("--requirements", help="requirements file (or pyproject.toml) to lock, added to the automatic lock")
    c.add_argument("--no-auto-lock", action="store_true",
                   help="lock only --requirements (not what loading and predicting the sample imports)")
    c.add_argument("--label", action="append", metavar="K=V")
    c.add_argument("--option", action="append", metavar="K=V", help="framework option, e.g. method=predict_proba")
    c.add_argument("--parent", metavar="NAME:VERSION")
    c.add_argument("--task", choices=("detect", "classify"), help="an ONNX detector or classifier (docs/vision.md)")
    c.add_argument("--classes", metavar="FILE", help="class names, one a line (with --task)")
    c.add_argument("--imgsz", metavar="N|H,W", help="the model's input size (with --task)")
    c.add_argument("--entrypoint", metavar="MODULE:CLASS", help="custom Model class (python framework)")
    c.add_argument("--allow-pickle", action="store_true", help="accept pickle-based formats (still scanned)")
    c.add_argument("--trust", action="append", metavar="TYPE[,TYPE]",
                   help="trust these types in a skops file beyond skops' and modelpod's lists (recorded)")
    c.add_argument("--encrypt", metavar="KEYFILE", help="store the weights AES-256-GCM encrypted under this "
                   "32-byte key (docs/security.md)")

    c = cmd("list", "list pods in the store")
    c.add_argument("name", nargs="?")
    c = cmd("show", "show a pod's manifest")
    c.add_argument("ref")
    c = cmd("tag", "point an alias at a version")
    c.add_argument("ref", metavar="NAME:VERSION")
    c.add_argument("alias")
    c = cmd("rm", "remove a version (or --all), or an alias with --alias")
    c.add_argument("ref")
    c.add_argument("--all", action="store_true")
    c.add_argument("--alias", dest="alias_only", action="store_true", help="remove only the alias NAME@ALIAS")
    c.add_argument("--force", action="store_true", help="remove a version even where an alias points at it")
    c = cmd("gc", "remove unreferenced blobs and what killed pack/import/pull runs left; report what it frees")
    c.add_argument("--dry-run", action="store_true", help="only report what would be freed")
    c = cmd("verify", "re-hash every file of a pod against its manifest (--signature: and who signed it); "
            "an image (registry ref, oci:DIR, docker-archive:FILE): check its signature with --key")
    c.add_argument("ref")
    c.add_argument("--signature", action="store_true", help="also check the pod's signatures: who signed what")
    c.add_argument("--key", action="append", metavar="PUB.pem",
                   help="a trusted key or CA certificate (repeatable; default trust.keys / MODELPOD_TRUST_KEYS)")
    from modelpod.image.trust_cli import add_verify_arguments

    add_verify_arguments(c)
    c = cmd("export", "write a pod as a tar archive")
    c.add_argument("ref")
    c.add_argument("-o", "--output", required=True)
    c = cmd("import", "import a pod archive")
    c.add_argument("file")
    c.add_argument("--name", help="store under another name")
    c = cmd("predict", "run one OIP v2 request (or .npy/.npz/.csv/.parquet/.jsonl) through a pod in-process")
    c.add_argument("ref")
    c.add_argument("--input")
    c.add_argument("--image", action="append", metavar="FILE", help="an image for a vision pod (repeatable)")
    c.add_argument("--annotate", metavar="OUT.png", help="with --image: write the image with the boxes drawn")
    c.add_argument("--decrypt-key", metavar="FILE", help="key for encrypted weights (or $MODELPOD_DECRYPT_KEY_FILE)")

    from modelpod.trust.cli import add_arguments as trust_arguments

    trust_arguments(sub, cmd)

    c = cmd("batch", "score files (CSV, Parquet, JSON Lines, .npy, images) with a pod; resumable, sharded")
    from modelpod.batch.cli import add_arguments as batch_arguments

    batch_arguments(c)

    c = cmd("serve", "serve pods over OIP v2 REST and gRPC")
    c.add_argument("refs", nargs="*", metavar="REF",
                   help="NAME, NAME:VERSION, NAME@ALIAS or a pod directory (the models of --config routes are added)")
    c.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    c.add_argument("--port", type=int, help="REST port (default 8080; 0 picks a free one)")
    c.add_argument("--grpc-port", type=int, help="gRPC port (default 8081 when grpcio is installed)")
    c.add_argument("--no-grpc", action="store_true", help="serve REST only")
    c.add_argument("--tls-cert", metavar="FILE", help="serve REST and gRPC over TLS: PEM certificate chain "
                   "(or $MODELPOD_TLS_CERT)")
    c.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (or $MODELPOD_TLS_KEY)")
    c.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA "
                   "(mutual TLS; or $MODELPOD_TLS_CLIENT_CA)")
    c.add_argument("--config", help="YAML: batching keys for all models, per model under 'models:', "
                   "traffic splits under 'routes:' (docs/traffic.md)")
    c.add_argument("--max-batch-rows", type=int)
    c.add_argument("--max-batch-wait-ms", type=float)
    c.add_argument("--inline-max-ms", type=float, metavar="MS",
                   help="run a model's batches on the event loop when it answers them in under MS "
                   "(default 1; 0: always on its own thread; or $MODELPOD_INLINE_MAX_MS)")
    c.add_argument("--token", help="require this bearer token (or $MODELPOD_TOKEN; visible in the process list); "
                   "--token-file also takes a YAML table of tokens with scopes, models and rate limits")
    c.add_argument("--token-file", metavar="PATH",
                   help="read the bearer token from this file (or $MODELPOD_TOKEN_FILE)")
    c.add_argument("--console", action="store_true", default=None,
                   help="serve the web console at /console (or $MODELPOD_CONSOLE=1; loopback clients only "
                   "unless a token is set; docs/console.md)")
    c.add_argument("--decrypt-key", metavar="FILE",
                   help="key for pods with encrypted weights (or $MODELPOD_DECRYPT_KEY_FILE)")
    from modelpod.serving.scaling import add_arguments as replica_arguments

    replica_arguments(c)

    c.add_argument("--wheel-cache", metavar="DIR", help="build pods' own environments offline from the wheels "
                   "in DIR (or $MODELPOD_WHEEL_CACHE; docs/environments.md)")
    c.add_argument("--env", dest="pod_env", choices=("auto", "own", "server"),
                   help="every model: its own environment when its pins differ (auto, the default), always, or never")

    from modelpod.serving.route_cli import add_arguments as route_arguments

    route_arguments(cmd("route", "traffic splits of a running server: list, show, set, report, rollout, rollback"))
    from modelpod.serving.token_cli import add_arguments as token_arguments

    token_arguments(cmd("token", "a new bearer token and its entry for a scoped token file (sha256 only)"))

    from modelpod.observe.cli import add_drift_arguments, add_observe_arguments

    add_observe_arguments(sub.add_parser("observe", help="print a Grafana dashboard or Prometheus alert rules"))
    add_drift_arguments(cmd("drift", "per-feature input drift (PSI) of a model on a running server"))

    from modelpod.serving.env_cli import add_arguments as env_arguments

    env_arguments(sub.add_parser("env", help="pods' own environments: list, show, build, rm"))

    c = cmd("build", "build a runnable OCI image of a pod, without a daemon")
    c.add_argument("ref")
    c.add_argument("--base", help="registry reference, oci:DIR[:TAG] or docker-archive:FILE "
                   "(default python:X.Y-slim, X.Y the pod's Python)")
    c.add_argument("--output", help="oci:DIR[:TAG] or docker-archive:FILE (default docker-archive:NAME-VERSION.tar)")
    c.add_argument("--push", metavar="REGISTRY/REPO[:TAG]")
    c.add_argument("--tag", metavar="NAME:TAG", help="the name docker load gives the image")
    c.add_argument("--source", metavar="URL", help="org.opencontainers.image.source annotation")
    c.add_argument("--revision", help="org.opencontainers.image.revision annotation (default: the pod digest)")
    c.add_argument("--with", dest="with_", action="append", choices=("batch", "otel", "trust"),
                   help="add a feature's packages to the runtime layer: batch (pyarrow, for `docker run IMAGE batch`), "
                   "otel (OpenTelemetry, for tracing), trust (cryptography: signatures, encrypted weights)")
    c.add_argument("--no-grpc", action="store_true", help="leave grpcio out: a slimmer image serving REST only")
    c.add_argument("--no-check", action="store_true",
                   help="skip loading and predicting the pod's sample with only the image's packages")
    from modelpod.image.trust_cli import add_arguments as trust_arguments
    from modelpod.image.trust_cli import add_build_arguments

    add_build_arguments(c)
    trust_arguments(sub, cmd)
    c = cmd("push", "push a pod to an OCI registry as an artifact")
    c.add_argument("ref")
    c.add_argument("target", metavar="REGISTRY/REPO[:TAG]")
    c = cmd("pull", "pull a pod from an OCI registry into the store")
    c.add_argument("source", metavar="REGISTRY/REPO[:TAG|@DIGEST]")

    from modelpod.deploy.cli import add_arguments as deploy_arguments

    deploy_arguments(sub.add_parser("deploy", help="Kubernetes: render and apply manifests, status, rollback"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env(home=Path(args.home).expanduser() if args.home else None)
        result = COMMANDS[args.command](args, settings)
        return result if isinstance(result, int) else 0
    except ModelpodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`modelpod list --json | head`): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
