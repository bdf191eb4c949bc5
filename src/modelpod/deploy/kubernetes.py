"""The pure renderer: a checked ``DeploySpec`` -> plain Kubernetes objects (dicts), same input same output.

Core kinds live here (Deployment, Service, PodDisruptionBudget, NetworkPolicy, ServiceAccount,
HorizontalPodAutoscaler, ConfigMap); the custom resources and the batch Job in ``objects``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from modelpod.deploy.spec import DeploySpec, PodFacts

Obj = dict[str, Any]
POD_DIR = "/opt/modelpod/pod"  # where the image builder puts the pod (image.plan.POD_DIR)
TOKEN_DIR = "/var/run/secrets/modelpod"
TLS_DIR = "/var/run/secrets/modelpod-tls"
STORE = "/tmp/modelpod"  # MODELPOD_HOME: the in-server canary's init containers put both pods there
CONFIG_DIR = "/etc/modelpod"
CONTAINER = "server"
METRIC = "modelpod_inflight_requests"  # per model, summed per pod by the adapter rule / KEDA query
DEFAULT_GRPC_PORT = 8081  # serving.server.DEFAULT_GRPC_PORT
UID = 65532  # the image's user (image.builder.USER)
TRACK = "modelpod.dev/track"
ANNOTATION_DIGEST = "modelpod.dev/digest"
ANNOTATION_IMAGE = "modelpod.dev/image"
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")


def render(spec: DeploySpec) -> list[Obj]:
    """Every object of the deployment, in the order they are applied."""
    from modelpod.deploy import objects

    if spec.job is not None:
        return [service_account(spec), objects.batch_job(spec)]
    if spec.kserve:
        return [service_account(spec), objects.inference_service(spec)]
    mode = spec.canary.chosen(spec.pod)[0] if spec.canary is not None else None
    out = [service_account(spec)]
    if mode == "server":
        out.append(routes_config(spec))
    out.append(service(spec, "stable"))
    if mode == "gateway":
        out.append(service(spec, "canary"))
    out.append(deployment(spec, "stable", server_canary=mode == "server"))
    if mode == "gateway":
        out.append(deployment(spec, "canary"))
    if spec.minimum >= 2:
        out.append(disruption_budget(spec))
    out.append(network_policy(spec))
    tracks = ["stable", "canary"] if mode == "gateway" else ["stable"]
    if spec.autoscaler in ("hpa", "cpu"):
        out += [autoscaler(spec, t) for t in tracks]
    elif spec.autoscaler == "keda":
        out += [objects.scaled_object(spec, t) for t in tracks]
    if mode == "gateway":
        out.append(objects.http_route(spec))
    if spec.service_monitor:
        out.append(objects.service_monitor(spec))
    return out


# -- names and labels -----------------------------------------------------------------------------
def object_name(spec: DeploySpec, track: str) -> str:
    return spec.name if track == "stable" else f"{spec.name}-{track}"


def label_value(text: str) -> str:
    """A label value: at most 63 of [A-Za-z0-9_.-], starting and ending with a letter or digit."""
    return _LABEL_VALUE.sub("-", text)[:63].strip("-_.")


def selector(spec: DeploySpec, track: str) -> dict[str, str]:
    """Stable across versions (a Deployment's selector cannot change), distinct per track."""
    return {"app.kubernetes.io/instance": spec.name, TRACK: track}


def labels(spec: DeploySpec, track: str = "stable", pod: PodFacts | None = None) -> dict[str, str]:
    pod = pod or (spec.canary.pod if track == "canary" and spec.canary else spec.pod)
    out = {
        "app.kubernetes.io/name": label_value(pod.name),
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": "batch" if spec.job is not None else "inference",
        "app.kubernetes.io/managed-by": "modelpod",
        "modelpod.dev/pod": label_value(pod.name),
        "modelpod.dev/digest": pod.digest.removeprefix("sha256:")[:16],
        TRACK: track,
    }
    if pod.version is not None:
        out["app.kubernetes.io/version"] = str(pod.version)
        out["modelpod.dev/version"] = str(pod.version)
    return dict(sorted(out.items()))


def metadata(spec: DeploySpec, name: str, track: str = "stable", **extra: Any) -> Obj:
    meta: Obj = {"name": name}
    if spec.namespace is not None:
        meta["namespace"] = spec.namespace
    meta["labels"] = labels(spec, track)
    meta.update(extra)
    return meta


# -- the pod template -----------------------------------------------------------------------------
def _quantity_bytes(size: int) -> str:
    """Mebibytes, rounded up to a multiple of 64."""
    return f"{max(1, -(-size // (64 * 1024**2))) * 64}Mi"


def resources(spec: DeploySpec, pod: PodFacts, extra_bytes: int = 0) -> Obj:
    """Requests from the flags, else the pod manifest's ``resources``, else sized from the model's files.

    Memory is requested and limited alike (the scheduler's promise holds); CPU has no limit, so a
    burst is never throttled.
    """
    cpu = spec.cpu or str(pod.resources.get("cpu") or "1")
    memory = spec.memory or (str(pod.resources["memory"]) if pod.resources.get("memory") else
                             _quantity_bytes(512 * 1024**2 + 3 * (pod.size + extra_bytes)))
    gpu = spec.gpu or int(pod.resources.get("gpu") or 0)
    out: Obj = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if gpu:
        out["limits"]["nvidia.com/gpu"] = gpu
        out["requests"]["nvidia.com/gpu"] = gpu
    return out


def container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "privileged": False, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security(spec: DeploySpec) -> Obj:
    out: Obj = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if not spec.openshift:  # OpenShift's restricted SCC picks the UID itself, with group 0
        out.update(runAsUser=UID, runAsGroup=UID, fsGroup=UID)
    return out


def env(spec: DeploySpec) -> list[Obj]:
    out: list[Obj] = [
        {"name": "MODELPOD_HOST", "value": "0.0.0.0"},
        {"name": "MODELPOD_PORT", "value": str(spec.http_port)},
        {"name": "MODELPOD_HOME", "value": STORE},
        {"name": "MODELPOD_DRAIN_TIMEOUT_S", "value": f"{spec.drain_timeout_s:g}"},
        {"name": "MODELPOD_LOG_JSON", "value": "true"},
    ]
    if spec.token_secret is not None:  # a file, not a variable: out of the environment and re-read on rotation
        out.append({"name": "MODELPOD_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"})
    if spec.tls_secret is not None:
        out += [{"name": "MODELPOD_TLS_CERT", "value": f"{TLS_DIR}/tls.crt"},
                {"name": "MODELPOD_TLS_KEY", "value": f"{TLS_DIR}/tls.key"}]
    return out


def token_volumes(spec: DeploySpec) -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) for the Secrets: the bearer token under key ``token``, the TLS pair, when given."""
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    if spec.token_secret is not None:
        volumes.append({"name": "token", "secret": {"secretName": spec.token_secret, "defaultMode": 0o440,
                                                    "items": [{"key": "token", "path": "token"}]}})
        mounts.append({"name": "token", "mountPath": TOKEN_DIR, "readOnly": True})
    if spec.tls_secret is not None:
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls_secret, "defaultMode": 0o440, "items": [
            {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return volumes, mounts


def probes(tls: bool = False) -> Obj:
    def get(path: str) -> Obj:
        return {"httpGet": {"path": path, "port": "http", "scheme": "HTTPS" if tls else "HTTP"}}

    return {
        # The server answers /live as soon as it listens, before models load: startup then gives
        # the loads up to 5 minutes before liveness may restart anything.
        "startupProbe": {**get("/v2/health/live"), "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 150},
        "readinessProbe": {**get("/v2/health/ready"), "periodSeconds": 5, "timeoutSeconds": 2,
                           "failureThreshold": 2, "successThreshold": 1},
        "livenessProbe": {**get("/v2/health/live"), "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }


def ports(spec: DeploySpec) -> list[Obj]:
    out = [{"name": "http", "containerPort": spec.http_port, "protocol": "TCP"}]
    if spec.grpc:
        out.append({"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"})
    return out


def grpc_args(spec: DeploySpec) -> list[str]:
    """The server listens for gRPC on 8081 when grpcio is in the image; another port is asked for explicitly."""
    if not spec.grpc:
        return ["--no-grpc"]
    return [] if spec.grpc_port == DEFAULT_GRPC_PORT else ["--grpc-port", str(spec.grpc_port)]


def server_container(spec: DeploySpec, image: str, pod: PodFacts, args: Sequence[str] = (),
                     mounts: Sequence[Obj] = (), extra_bytes: int = 0, refs: Sequence[str] = (POD_DIR,)) -> Obj:
    return {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [spec.python, "-m", "modelpod"],
        "args": ["serve", *refs, *args, *grpc_args(spec)],
        "env": env(spec),
        "ports": ports(spec),
        **probes(spec.tls_secret is not None),
        # The pause lets endpoints drop this pod before the server stops taking requests.
        "lifecycle": {"preStop": {"sleep": {"seconds": spec.pre_stop_s}}},
        "resources": resources(spec, pod, extra_bytes),
        "securityContext": container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *mounts],
    }


def spread(spec: DeploySpec, track: str) -> list[Obj]:
    """Replicas spread over nodes and zones (soft: a one-zone cluster still schedules)."""
    return [{"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": selector(spec, track)}, "matchLabelKeys": ["pod-template-hash"]}
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]


def pod_spec(spec: DeploySpec, containers: list[Obj], *, init: Sequence[Obj] = (), volumes: Sequence[Obj] = (),
             restart: str | None = None, track: str | None = "stable", gpu: bool = False, tmp_bytes: int = 0) -> Obj:
    out: Obj = {
        "serviceAccountName": spec.name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(spec),
        "terminationGracePeriodSeconds": spec.grace_s,
        "containers": containers,
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": _quantity_bytes(1024**3 + tmp_bytes)}}, *volumes],
    }
    if init:
        out["initContainers"] = list(init)
    if restart is not None:
        out["restartPolicy"] = restart
    if track is not None:
        out["topologySpreadConstraints"] = spread(spec, track)
    if gpu:
        out["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if spec.pull_secret:
        out["imagePullSecrets"] = [{"name": spec.pull_secret}]
    return out


def template_annotations(spec: DeploySpec, pod: PodFacts, image: str, extra: Mapping[str, str] | None = None) -> Obj:
    return dict(sorted({
        "prometheus.io/scrape": "true", "prometheus.io/port": str(spec.http_port), "prometheus.io/path": "/metrics",
        **({"prometheus.io/scheme": "https"} if spec.tls_secret is not None else {}),
        ANNOTATION_DIGEST: pod.digest, ANNOTATION_IMAGE: image, **dict(extra or {}),
    }.items()))


# -- objects --------------------------------------------------------------------------------------
def service_account(spec: DeploySpec) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(spec, spec.name),
            "automountServiceAccountToken": False}


def service(spec: DeploySpec, track: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(spec, object_name(spec, track), track),
            "spec": {"type": "ClusterIP", "selector": selector(spec, track), "ports": [
                {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP",
                 "appProtocol": "http" if p["name"] == "http" else "kubernetes.io/h2c"} for p in ports(spec)]}}


def deployment(spec: DeploySpec, track: str, *, server_canary: bool = False) -> Obj:
    canary = spec.canary
    pod, image = (canary.pod, canary.image) if track == "canary" and canary else (spec.pod, spec.image)
    args: list[str] = []
    refs: list[str] = [POD_DIR]
    mounts: list[Obj] = []
    init: list[Obj] = []
    volumes: list[Obj] = []
    extra: dict[str, str] = {}
    extra_bytes = 0
    if server_canary and canary is not None:
        # Each image puts its pod into the replica's store under an alias; the server serves both
        # and its route (the ConfigMap) splits between them.
        refs = [f"{spec.pod.name}@stable", f"{spec.pod.name}@canary"]
        args = ["--config", f"{CONFIG_DIR}/config.yaml"]
        mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
        volumes = [{"name": "config", "configMap": {"name": f"{spec.name}-routes"}}]
        init = [seed_container(spec, spec.image, "stable"), seed_container(spec, canary.image, "canary")]
        extra = {"modelpod.dev/config-sha256": _sha(routes_config(spec)["data"])}
        extra_bytes = canary.pod.size
    secret, secret_mounts = token_volumes(spec)
    volumes, mounts = [*volumes, *secret], [*mounts, *secret_mounts]
    server = server_container(spec, image, pod, args, mounts, extra_bytes, refs)
    body: Obj = {
        "selector": {"matchLabels": selector(spec, track)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "revisionHistoryLimit": 10,
        "progressDeadlineSeconds": 600,
        "template": {
            "metadata": {"labels": labels(spec, track), "annotations": template_annotations(spec, pod, image, extra)},
            "spec": pod_spec(spec, [server], init=init, volumes=volumes, track=track,
                             gpu="nvidia.com/gpu" in server["resources"]["limits"],
                             tmp_bytes=spec.pod.size + canary.pod.size if init and canary else 0),
        },
    }
    if spec.autoscaler == "none":
        body = {"replicas": spec.replicas if track == "stable" else 1, **body}
    # With an autoscaler, replicas is left out: the autoscaler owns it, and an apply must not reset it.
    annotations = {ANNOTATION_DIGEST: pod.digest, ANNOTATION_IMAGE: image}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": metadata(spec, object_name(spec, track), track, annotations=annotations), "spec": body}


def seed_container(spec: DeploySpec, image: str, alias: str) -> Obj:
    """An init container putting ``image``'s pod into the replica's store as ``NAME@alias``."""
    return {"name": f"pod-{alias}", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": [spec.python, "-m", "modelpod.deploy.seed"], "args": ["--home", STORE, "--alias", alias],
            "env": [e for e in env(spec) if e["name"] == "MODELPOD_HOME"],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "securityContext": container_security(), "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}


def routes_config(spec: DeploySpec) -> Obj:
    """The server's ``--config``: one route splitting the pod's name between stable and canary."""
    assert spec.canary is not None
    name = spec.pod.name
    config = {"routes": {name: {"variants": [
        {"model": f"{name}@stable", "weight": 100 - spec.canary.weight},
        {"model": f"{name}@canary", "weight": spec.canary.weight}]}}}
    text = (f"# modelpod deploy kubernetes: {spec.pod.ref} and {spec.canary.pod.ref} (canary) split in the server\n"
            + yaml.safe_dump(config, sort_keys=True))
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, f"{spec.name}-routes"),
            "data": {"config.yaml": text}}


def disruption_budget(spec: DeploySpec) -> Obj:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(spec, spec.name),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector(spec, "stable")},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


def network_policy(spec: DeploySpec) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata(spec, spec.name),
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": spec.name}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"protocol": "TCP", "port": p["name"]} for p in ports(spec)]}]}}


def autoscaler(spec: DeploySpec, track: str) -> Obj:
    cpu: Obj = {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                           "averageUtilization": 70}}}
    inflight: Obj = {"type": "Pods", "pods": {"metric": {"name": METRIC},
                                              "target": {"type": "AverageValue",
                                                         "averageValue": f"{spec.target_inflight:g}"}}}
    # In-flight requests first; CPU too, so the HPA still scales up when the custom metric is missing.
    metrics = [cpu] if spec.autoscaler == "cpu" else [inflight, cpu]
    name = object_name(spec, track)
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": metadata(spec, name, track),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": max(1, spec.minimum if track == "stable" else 1),
                     "maxReplicas": spec.max_replicas, "metrics": metrics, "behavior": behavior()}}


def behavior() -> Obj:
    """Up fast (double, or +4 pods, every 15 s), down slowly (after 5 minutes, at most half a minute)."""
    return {"scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                        "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15},
                                     {"type": "Pods", "value": 4, "periodSeconds": 15}]},
            "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                          "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}]}}


def adapter_rule(spec: DeploySpec) -> Obj:
    """The prometheus-adapter rule serving ``modelpod_inflight_requests`` per pod to the HPA.

    A ConfigMap in prometheus-adapter's own format (``config.yaml`` holding ``rules:``): merge its
    rule into the adapter's configuration; it is not one of the deployment's resources.
    """
    rules = {"rules": [{
        "seriesQuery": f'{METRIC}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{METRIC}$", "as": METRIC},
        "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
    }]}
    meta: Obj = {"name": "prometheus-adapter-modelpod", "labels": {"app.kubernetes.io/managed-by": "modelpod"}}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {"config.yaml": yaml.safe_dump(rules, sort_keys=False)}}


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
