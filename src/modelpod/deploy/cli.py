"""``modelpod deploy kubernetes|status|rollback``: flags -> a checked spec -> objects -> files or a cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from modelpod.deploy.spec import AUTOSCALERS, CANARY_MODES, BatchJob, Canary, DeploySpec, PodFacts, default_name
from modelpod.errors import UsageError
from modelpod.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True)

    def target(c: argparse.ArgumentParser) -> None:
        c.add_argument("--namespace", "-n", help="namespace (default: the context's, else 'default')")
        c.add_argument("--context", help="kubeconfig context (default: the current one)")
        c.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
        c.add_argument("--timeout", type=float, default=10.0, help="seconds for each API call (default 10)")
        c.add_argument("--json", action="store_true", help="print JSON")

    k = sub.add_parser("kubernetes", help="render Kubernetes manifests for a pod (and apply them with --apply)")
    k.add_argument("ref", metavar="REF", help="the pod: NAME, NAME:VERSION, NAME@ALIAS or a pod directory")
    k.add_argument("--image", help="the pod's image, IMAGE@sha256:DIGEST (from `modelpod build --push`)")
    k.add_argument("--push", metavar="REGISTRY/REPO", help="build and push the image first; pin it by digest")
    k.add_argument("--base", help="base image for --push (as `modelpod build --base`)")
    k.add_argument("--name", help="name of the objects (default: the pod's name)")
    k.add_argument("--replicas", type=int, default=2, help="replicas (the autoscaler's minimum; default 2)")
    k.add_argument("--min", dest="min_replicas", type=int, help="autoscaler minimum (default --replicas)")
    k.add_argument("--max", dest="max_replicas", type=int, default=10, help="autoscaler maximum (default 10)")
    k.add_argument("--target-inflight", type=float, default=4.0,
                   help="in-flight requests per replica the autoscaler aims at (default 4)")
    k.add_argument("--autoscaler", help=f"{'|'.join(AUTOSCALERS)} (default hpa: in-flight + CPU; "
                   "keda with --scale-to-zero)")
    k.add_argument("--scale-to-zero", action="store_true", help="KEDA, down to 0 replicas when idle (--min 0)")
    k.add_argument("--cpu", help="CPU request, e.g. 1 or 500m (default: the pod's resources, else 1)")
    k.add_argument("--memory", help="memory request and limit, e.g. 2Gi (default: the pod's, else sized from it)")
    k.add_argument("--gpu", type=int, default=0, help="nvidia.com/gpu per replica")
    k.add_argument("--token-secret", metavar="NAME", help="Secret whose key 'token' is the server's bearer token")
    k.add_argument("--tls-secret", metavar="NAME", help="kubernetes.io/tls Secret (tls.crt, tls.key): serve REST "
                   "and gRPC over TLS, probes and scrapes over HTTPS")
    k.add_argument("--canary", metavar="REF2:WEIGHT", help="send WEIGHT percent of traffic to pod REF2")
    k.add_argument("--canary-image", metavar="IMAGE", help="REF2's image (with --push it is built too)")
    k.add_argument("--canary-mode", default="auto", help=f"{'|'.join(CANARY_MODES)} (default: by model size)")
    k.add_argument("--gateway", default="modelpod", metavar="[NS/]NAME", help="Gateway the HTTPRoute attaches to")
    k.add_argument("--kserve", action="store_true", help="render a KServe InferenceService instead")
    k.add_argument("--service-monitor", action="store_true", help="add a prometheus-operator ServiceMonitor")
    k.add_argument("--prometheus-url", help="Prometheus for KEDA's trigger")
    k.add_argument("--port", type=int, default=8080, help="container HTTP port (default 8080)")
    k.add_argument("--grpc-port", type=int, default=8081, help="container gRPC port (default 8081)")
    k.add_argument("--drain-timeout", type=float, metavar="S",
                   help="seconds the server drains on SIGTERM (default $MODELPOD_DRAIN_TIMEOUT_S or 30); "
                   "the grace period is longer")
    k.add_argument("--no-grpc", action="store_true", help="REST only: no gRPC port in the pod or the Service")
    k.add_argument("--openshift", action="store_true", help="no fixed UID: the platform picks one (group 0)")
    k.add_argument("--pull-secret", metavar="NAME", help="imagePullSecret for a private registry")
    k.add_argument("--job", action="store_true", help="render an Indexed Job running `modelpod batch` instead")
    k.add_argument("--input", help="--job: the batch input (a path the job's pods see)")
    k.add_argument("--output", help="--job: the batch output")
    k.add_argument("--shards", type=int, default=1, help="--job: shards, one per completion index")
    k.add_argument("--parallelism", type=int, help="--job: shards running at once (default all)")
    k.add_argument("--job-volume", metavar="PVC", help="--job: PersistentVolumeClaim mounted at /data")
    k.add_argument("--batch-arg", action="append", default=[], metavar="ARG", help="--job: extra batch argument")
    k.add_argument("-o", "--out", metavar="DIR|-", help="a directory (with kustomization.yaml), or - for stdout")
    k.add_argument("--apply", action="store_true", help="apply with server-side apply (field manager modelpod)")
    k.add_argument("--force-conflicts", action="store_true", help="take over fields another manager owns")
    k.add_argument("--dry-run", action="store_true",
                   help="with --apply: the API server checks every object (dryRun=All) and stores nothing")
    k.add_argument("--wait", action="store_true", help="with --apply: wait until the rollout is done")
    k.add_argument("--wait-timeout", type=float, default=600.0, help="seconds --wait waits (default 600)")
    target(k)

    s = sub.add_parser("status", help="a deployment's rollout, replicas, images and history")
    s.add_argument("name")
    target(s)
    r = sub.add_parser("rollback", help="re-apply the Deployment as it was with its previous image")
    r.add_argument("name")
    r.add_argument("--wait", action="store_true")
    r.add_argument("--wait-timeout", type=float, default=600.0)
    r.add_argument("--force-conflicts", action="store_true")
    target(r)


def deploy_command(args: argparse.Namespace, settings: Settings) -> Any:
    if args.deploy_command == "kubernetes":
        return _kubernetes(args, settings)
    from modelpod.deploy import apply

    cluster = apply.Cluster(args.context, args.kubeconfig, args.timeout)
    if args.deploy_command == "status":
        data = apply.status(cluster, args.name, args.namespace)
        _emit(args, data, lambda: _print_status(data))
        return 0 if all(d["rollout"] != "failed" for d in data["deployments"]) else 1
    data = apply.rollback(cluster, args.name, args.namespace, force=args.force_conflicts)
    if args.wait:
        data["rollout"] = apply.wait_rollout(cluster, data["namespace"], [args.name], args.wait_timeout)
    _emit(args, data, lambda: print(f"rolled back Deployment {data['namespace']}/{args.name}: "
                                    f"{data['from']} -> {data['to']}"))
    return 0


# -- render / apply --------------------------------------------------------------------------------
def _facts(ref: str, settings: Settings) -> tuple[PodFacts, Any, int | None]:
    from modelpod.api import open_pod
    from modelpod.store import Store

    path = Path(ref)
    version: int | None = None
    if not (path / "modelpod.yaml").is_file():
        version = Store(settings.home).get(ref).version
    pod = open_pod(ref, settings=settings)
    m = pod.manifest
    facts = PodFacts(m.name, version, pod.digest, sum(f.size for f in m.files), m.framework,
                     tuple(m.requirements), dict(m.resources), m.serving.timeout_s)
    return facts, pod, version


def _build_and_push(pod: Any, version: int | None, repo: str, base: str | None, settings: Settings,
                    quiet: bool, *, grpc: bool = True, batch: bool = False) -> tuple[str, str]:
    """(IMAGE@DIGEST, the image's python) after ``modelpod build --push REPO``."""
    from modelpod.image.builder import BuildOptions, ImageBuilder
    from modelpod.image.cli import credentials_for
    from modelpod.image.progress import Silent
    from modelpod.image.registry import Reference, Registry

    target = Reference.parse(repo)
    made: dict[str, Registry] = {}

    def registry(host: str) -> Registry:
        if host not in made:
            made[host] = Registry(host, credentials=credentials_for(host))
        return made[host]

    builder = ImageBuilder(settings.home / "cache", registry, Silent())
    built = builder.build(pod, version, BuildOptions(base=base, grpc=grpc, features=("batch",) if batch else ()))
    tagged = target if target.tag else target.with_tag(str(version) if version is not None else "latest")
    builder.push(built, tagged)
    from modelpod.image.trust_cli import attach_sbom

    attach_sbom(builder, built, tagged)
    pinned = f"{target.host}/{target.repository}@{built.digest}"
    if not quiet:
        print(f"pushed {tagged}  {built.digest}", file=sys.stderr)
    return pinned, built.interpreter.path


def build_spec(args: argparse.Namespace, settings: Settings) -> tuple[DeploySpec, list[str]]:
    """The checked spec from the flags (building and pushing first with --push), plus notes to print."""
    notes: list[str] = []
    facts, pod, version = _facts(args.ref, settings)
    python = "python3"
    image = args.image
    if args.push and args.image:
        raise UsageError("give --image or --push, not both")
    if args.push:
        image, python = _build_and_push(pod, version, args.push, args.base, settings, args.json,
                                        grpc=not args.no_grpc, batch=args.job)
    if not image:
        raise UsageError("deploy kubernetes needs --image IMAGE@sha256:DIGEST or --push REGISTRY/REPO")
    canary = None
    if args.canary:
        from modelpod.deploy.spec import parse_canary

        ref2, weight = parse_canary(args.canary)
        facts2, pod2, version2 = _facts(ref2, settings)
        image2 = args.canary_image
        if args.push and not image2:
            image2, _ = _build_and_push(pod2, version2, args.push, args.base, settings, args.json,
                                        grpc=not args.no_grpc)
        if not image2:
            raise UsageError("--canary needs --canary-image IMAGE@sha256:DIGEST (or --push to build it)")
        canary = Canary(facts2, image2, weight, args.canary_mode)
    job = None
    if args.job:
        if not args.input or not args.output:
            raise UsageError("--job needs --input and --output (paths the job's pods see, e.g. under /data)")
        job = BatchJob(args.input, args.output, args.shards, args.parallelism, args.job_volume,
                       tuple(args.batch_arg))
    extra: dict[str, Any] = {"prometheus_url": args.prometheus_url} if args.prometheus_url else {}
    drain = args.drain_timeout if args.drain_timeout is not None else settings.drain_timeout_s
    spec = DeploySpec(
        name=args.name or default_name(facts.name), image=image, pod=facts, namespace=args.namespace,
        replicas=args.replicas, max_replicas=args.max_replicas,
        min_replicas=0 if args.scale_to_zero and args.min_replicas is None else args.min_replicas,
        target_inflight=args.target_inflight, scale_to_zero=args.scale_to_zero,
        autoscaler=args.autoscaler or ("keda" if args.scale_to_zero else "hpa"),
        cpu=args.cpu, memory=args.memory, gpu=args.gpu, token_secret=args.token_secret, canary=canary,
        tls_secret=getattr(args, "tls_secret", None),
        kserve=args.kserve, service_monitor=args.service_monitor, job=job, gateway=args.gateway, python=python,
        http_port=args.port, grpc_port=args.grpc_port, grpc=not args.no_grpc, openshift=args.openshift,
        pull_secret=args.pull_secret, drain_timeout_s=drain, **extra,
    ).check(apply=args.apply)
    if canary is not None and not args.kserve and not args.job:
        mode, why = canary.chosen(facts)
        notes.append(f"canary: {'one Deployment, split in the server' if mode == 'server' else 'two Deployments and a Gateway API HTTPRoute'} "  # noqa: E501
                     f"({why})")
    from modelpod.deploy.spec import DIGEST

    if not DIGEST.search(image):
        notes.append(f"warning: {image} is not pinned by digest; replicas may run different bytes")
    if spec.minimum < 2 and spec.job is None and not spec.kserve:
        notes.append("note: fewer than 2 replicas, so no PodDisruptionBudget (a drain would have to stop the only one)")
    return spec, notes


def _kubernetes(args: argparse.Namespace, settings: Settings) -> int:
    from modelpod.deploy import output
    from modelpod.deploy.kubernetes import adapter_rule, render

    spec, notes = build_spec(args, settings)
    objects = render(spec)
    served = not (spec.job or spec.kserve)
    extra = {output.ADAPTER_RULE_FILE: adapter_rule(spec)} if spec.autoscaler == "hpa" and served else {}
    data: dict[str, Any] = {"name": spec.name, "image": spec.image, "objects": [f"{o['kind']}/{o['metadata']['name']}"
                                                                                for o in objects], "notes": notes}
    if spec.canary is not None:
        data["canary_mode"] = spec.canary.chosen(spec.pod)[0]
    out = args.out if args.out is not None else (None if args.apply else "-")
    if out == "-":
        text = output.stream(objects)
        if args.json:
            data["yaml"] = text
        else:
            sys.stdout.write(text)
    elif out is not None:
        written = output.write_directory(Path(out), objects, extra)
        data["directory"] = str(out)
        data["files"] = [p.name for p in written]
    if extra:
        notes.append("autoscaling on in-flight requests needs prometheus-adapter with the rule in "
                     f"{output.ADAPTER_RULE_FILE} (written with -o DIR; see docs/kubernetes.md)")
    if args.apply:
        from modelpod.deploy import apply

        cluster = apply.Cluster(args.context, args.kubeconfig, args.timeout)
        report = apply.apply_all(cluster, objects, spec.namespace, force=args.force_conflicts,
                                 dry_run=args.dry_run)
        if args.wait and not args.dry_run:
            names = [o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"]
            report.rollout = apply.wait_rollout(cluster, report.namespace, names, args.wait_timeout)
        data["apply"] = report.to_dict()
    human_out = sys.stderr if out == "-" else sys.stdout
    _emit(args, data, lambda: _print_render(data, human_out))
    return 0


def _print_render(data: dict[str, Any], out: Any) -> None:
    for note in data["notes"]:
        print(note, file=out)
    if "directory" in data:
        print(f"wrote {len(data['files'])} files to {data['directory']} (kubectl apply -k {data['directory']})",
              file=out)
    if "apply" in data:
        report = data["apply"]
        verb = "checked (server dry run)" if report["dry_run"] else "applied"
        print(f"{verb} {len(report['applied'])} objects in namespace {report['namespace']} "
              f"(context {report['context']}, field manager modelpod)", file=out)
        for name, words in report["rollout"].items():
            print(f"rolled out Deployment {name}: {words}", file=out)


def _print_status(data: dict[str, Any]) -> None:
    print(f"{data['namespace']}/{data['name']}  (context {data['context']})")
    for d in data["deployments"]:
        print(f"  Deployment {d['name']}: {d['rollout']} ({d['detail']}), {d['ready']}/{d['replicas']} ready")
        print(f"    image  {d['image']}")
        if d.get("autoscaler"):
            a = d["autoscaler"]
            print(f"    autoscaler  {a['current']} -> {a['desired']} replicas (min {a['min']}, max {a['max']})")
        if len(d["history"]) > 1:
            print("    history (oldest first): " + ", ".join(str(i) for i in d["history"]))


def _emit(args: argparse.Namespace, data: Any, human: Any) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, sort_keys=True))
    else:
        human()
