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

from modelpod.arguments import command_of, parser
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


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = parser(command_of(words)).parse_args(words)
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
