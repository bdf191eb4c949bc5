"""The ``modelpod`` command line's arguments: one group per command (or a few), built on demand.

Each group adds the arguments of its commands, and its imports are its own. A run names its
command, and only that group is built: ``serve`` then starts without importing the image, deploy,
trust and batch tooling that the other commands' arguments bring in (cold start, issue 17).
``parser()`` without a command builds them all (``modelpod --help``, an unknown command).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from modelpod import __version__

Sub = Any  # argparse's _SubParsersAction
Cmd = Callable[[str, str], argparse.ArgumentParser]


def _pack_arguments(sub: Sub, cmd: Cmd) -> None:
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


def _store_arguments(sub: Sub, cmd: Cmd) -> None:
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


def _verify_arguments(sub: Sub, cmd: Cmd) -> None:
    c = cmd("verify", "re-hash every file of a pod against its manifest (--signature: and who signed it); "
            "an image (registry ref, oci:DIR, docker-archive:FILE): check its signature with --key")
    c.add_argument("ref")
    c.add_argument("--signature", action="store_true", help="also check the pod's signatures: who signed what")
    c.add_argument("--key", action="append", metavar="PUB.pem",
                   help="a trusted key or CA certificate (repeatable; default trust.keys / MODELPOD_TRUST_KEYS)")
    from modelpod.image.trust_cli import add_verify_arguments

    add_verify_arguments(c)


def _archive_arguments(sub: Sub, cmd: Cmd) -> None:
    c = cmd("export", "write a pod as a tar archive")
    c.add_argument("ref")
    c.add_argument("-o", "--output", required=True)
    c = cmd("import", "import a pod archive")
    c.add_argument("file")
    c.add_argument("--name", help="store under another name")


def _predict_arguments(sub: Sub, cmd: Cmd) -> None:
    c = cmd("predict", "run one OIP v2 request (or .npy/.npz/.csv/.parquet/.jsonl) through a pod in-process")
    c.add_argument("ref")
    c.add_argument("--input")
    c.add_argument("--image", action="append", metavar="FILE", help="an image for a vision pod (repeatable)")
    c.add_argument("--annotate", metavar="OUT.png", help="with --image: write the image with the boxes drawn")
    c.add_argument("--decrypt-key", metavar="FILE", help="key for encrypted weights (or $MODELPOD_DECRYPT_KEY_FILE)")


def _trust_arguments(sub: Sub, cmd: Cmd) -> None:
    from modelpod.trust.cli import add_arguments

    add_arguments(sub, cmd)


def _batch_arguments(sub: Sub, cmd: Cmd) -> None:
    c = cmd("batch", "score files (CSV, Parquet, JSON Lines, .npy, images) with a pod; resumable, sharded")
    from modelpod.batch.cli import add_arguments

    add_arguments(c)


def _serve_arguments(sub: Sub, cmd: Cmd) -> None:
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


def _route_arguments(sub: Sub, cmd: Cmd) -> None:
    from modelpod.serving.route_cli import add_arguments

    add_arguments(cmd("route", "traffic splits of a running server: list, show, set, report, rollout, rollback"))


def _token_arguments(sub: Sub, cmd: Cmd) -> None:
    from modelpod.serving.token_cli import add_arguments

    add_arguments(cmd("token", "a new bearer token and its entry for a scoped token file (sha256 only)"))


def _observe_arguments(sub: Sub, cmd: Cmd) -> None:
    from modelpod.observe.cli import add_drift_arguments, add_observe_arguments

    add_observe_arguments(sub.add_parser("observe", help="print a Grafana dashboard or Prometheus alert rules"))
    add_drift_arguments(cmd("drift", "per-feature input drift (PSI) of a model on a running server"))


def _env_arguments(sub: Sub, cmd: Cmd) -> None:
    from modelpod.serving.env_cli import add_arguments

    add_arguments(sub.add_parser("env", help="pods' own environments: list, show, build, rm"))


def _build_arguments(sub: Sub, cmd: Cmd) -> None:
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
    from modelpod.image.trust_cli import add_build_arguments

    add_build_arguments(c)


def _image_trust_arguments(sub: Sub, cmd: Cmd) -> None:
    from modelpod.image.trust_cli import add_arguments

    add_arguments(sub, cmd)


def _registry_arguments(sub: Sub, cmd: Cmd) -> None:
    c = cmd("push", "push a pod to an OCI registry as an artifact")
    c.add_argument("ref")
    c.add_argument("target", metavar="REGISTRY/REPO[:TAG]")
    c = cmd("pull", "pull a pod from an OCI registry into the store")
    c.add_argument("source", metavar="REGISTRY/REPO[:TAG|@DIGEST]")


def _deploy_arguments(sub: Sub, cmd: Cmd) -> None:
    from modelpod.deploy.cli import add_arguments

    add_arguments(sub.add_parser("deploy", help="Kubernetes: render and apply manifests, status, rollback"))


# (the commands a group adds, the group), in the order `modelpod --help` lists them
ARGUMENTS: tuple[tuple[tuple[str, ...], Callable[[Sub, Cmd], None]], ...] = (
    (("pack",), _pack_arguments),
    (("list", "show", "tag", "rm", "gc"), _store_arguments),
    (("verify",), _verify_arguments),
    (("export", "import"), _archive_arguments),
    (("predict",), _predict_arguments),
    (("sign", "encrypt"), _trust_arguments),
    (("batch",), _batch_arguments),
    (("serve",), _serve_arguments),
    (("route",), _route_arguments),
    (("token",), _token_arguments),
    (("observe", "drift"), _observe_arguments),
    (("env",), _env_arguments),
    (("build",), _build_arguments),
    (("sbom", "rebase"), _image_trust_arguments),
    (("push", "pull"), _registry_arguments),
    (("deploy",), _deploy_arguments),
)


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line: every command's arguments, or with ``command`` only the group holding it."""
    p = argparse.ArgumentParser(prog="modelpod", description="Model containers: pack, version, build, serve.")
    p.add_argument("--version", action="version", version=f"modelpod {__version__}")
    p.add_argument("--home", help="store directory (default $MODELPOD_HOME or ~/.modelpod)")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--json", action="store_true", help="print JSON")
        return c

    for names, add in ARGUMENTS:
        if command is None or command in names:
            add(sub, cmd)
    return p


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (the first word after the global options), or None when it names
    none that is known, or asks for the global help: then the whole parser is built."""
    known = {name for names, _ in ARGUMENTS for name in names}
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            return None
        if word == "--home":
            next(words, None)
        elif not word.startswith("-"):
            return word if word in known else None
    return None
