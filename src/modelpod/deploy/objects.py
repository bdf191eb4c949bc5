"""The objects beyond the core serving set: KEDA ScaledObject, Gateway API HTTPRoute, ServiceMonitor,
KServe InferenceService, and the Indexed Job for ``modelpod batch``."""

from __future__ import annotations

from modelpod.deploy.kubernetes import (
    CONTAINER,
    METRIC,
    POD_DIR,
    Obj,
    behavior,
    container_security,
    env,
    labels,
    metadata,
    object_name,
    pod_spec,
    probes,
    resources,
    server_container,
    template_annotations,
    token_volumes,
)
from modelpod.deploy.spec import DeploySpec, split_gateway


def scaled_object(spec: DeploySpec, track: str) -> Obj:
    """KEDA on the Deployment's in-flight requests per replica, from Prometheus (to zero when asked)."""
    name = object_name(spec, track)
    namespace = spec.namespace
    # Pods of this Deployment only: its ReplicaSets name them NAME-<hash>-<id>.
    query = f'sum({METRIC}{{namespace="{namespace}",pod=~"{name}-[a-z0-9]+-[a-z0-9]+"}})'
    minimum = 0 if spec.scale_to_zero else max(1, spec.minimum if track == "stable" else 1)
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": metadata(spec, name, track),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicaCount": minimum, "maxReplicaCount": spec.max_replicas,
                "pollingInterval": 15, "cooldownPeriod": 300,
                "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior()}},
                "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                    "serverAddress": spec.prometheus_url, "query": query,
                    "threshold": f"{spec.target_inflight:g}", "activationThreshold": "0"}}],
            }}


def http_route(spec: DeploySpec) -> Obj:
    """Weighted split between the stable and canary Services, on the Gateway named by ``--gateway``."""
    assert spec.canary is not None
    gw_namespace, gw_name = split_gateway(spec.gateway)
    parent: Obj = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw_name}
    if gw_namespace:
        parent["namespace"] = gw_namespace
    weight = spec.canary.weight
    backends = [{"group": "", "kind": "Service", "name": object_name(spec, track), "port": spec.http_port,
                 "weight": w} for track, w in (("stable", 100 - weight), ("canary", weight))]
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": metadata(spec, spec.name),
            "spec": {"parentRefs": [parent], "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}], "backendRefs": backends}]}}


def service_monitor(spec: DeploySpec) -> Obj:
    """prometheus-operator scrapes ``/metrics`` of every Service of the deployment (with the token when set)."""
    endpoint: Obj = {"port": "http", "path": "/metrics", "interval": "15s", "scheme": "http"}
    if spec.tls_secret is not None:  # the Secret's ca.crt (cert-manager writes one) checks the Service's name
        service = f"{spec.name}.{spec.namespace}.svc" if spec.namespace else spec.name
        endpoint.update(scheme="https", tlsConfig={
            "ca": {"secret": {"name": spec.tls_secret, "key": "ca.crt", "optional": True}}, "serverName": service})
    if spec.token_secret is not None:
        endpoint["authorization"] = {"type": "Bearer", "credentials": {"name": spec.token_secret, "key": "token"}}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": metadata(spec, spec.name),
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": spec.name,
                                                  "app.kubernetes.io/managed-by": "modelpod"}},
                     "endpoints": [endpoint]}}


def inference_service(spec: DeploySpec) -> Obj:
    """The same image as a KServe custom predictor, in raw deployment mode (no Knative, no mesh)."""
    secret, secret_mounts = token_volumes(spec)
    server = server_container(spec, spec.image, spec.pod, mounts=secret_mounts)
    container = {k: v for k, v in server.items() if k not in ("lifecycle",)}
    container["name"] = "kserve-container"
    container["ports"] = [{"name": "http1", "containerPort": spec.http_port, "protocol": "TCP"}]
    for key, probe in probes(spec.tls_secret is not None).items():
        container[key] = {**probe, "httpGet": {**probe["httpGet"], "port": spec.http_port}}
    predictor: Obj = {
        "minReplicas": spec.minimum, "maxReplicas": spec.max_replicas,
        # Raw mode scales with an HPA, which KServe drives on CPU or memory only.
        "scaleMetric": "cpu", "scaleTarget": 70,
        "serviceAccountName": spec.name, "containers": [container],
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": spec.grace_s,
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}, *secret],
    }
    meta = metadata(spec, spec.name, annotations={
        "serving.kserve.io/deploymentMode": "RawDeployment", "serving.kserve.io/autoscalerClass": "hpa"})
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": predictor}}


def batch_job(spec: DeploySpec) -> Obj:
    """An Indexed Job: completion index I runs ``modelpod batch`` on shard I of N (JOB_COMPLETION_INDEX)."""
    job = spec.job
    assert job is not None
    args = ["batch", POD_DIR, "--input", job.input, "--output", job.output, "--shards", str(job.shards),
            "--resume", *job.args]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[Obj] = []
    if job.volume_claim:
        mounts.append({"name": "data", "mountPath": "/data"})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": job.volume_claim}})
    container: Obj = {
        "name": CONTAINER, "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "command": [spec.python, "-m", "modelpod"], "args": args,
        "env": [e for e in env(spec) if e["name"] in ("MODELPOD_HOME", "MODELPOD_LOG_JSON")],
        "resources": resources(spec, spec.pod), "securityContext": container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError", "volumeMounts": mounts,
    }
    template_spec = pod_spec(spec, [container], volumes=volumes, restart="Never", track=None,
                             gpu="nvidia.com/gpu" in container["resources"]["limits"])
    annotations = {k: v for k, v in template_annotations(spec, spec.pod, spec.image).items()
                   if not k.startswith("prometheus.io/")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata(spec, spec.name),
            "spec": {
                "completionMode": "Indexed", "completions": job.shards,
                "parallelism": min(job.shards, job.parallelism or job.shards),
                # A failed shard is retried on its own; the others go on.
                "backoffLimitPerIndex": job.backoff_per_index, "ttlSecondsAfterFinished": 86400,
                "template": {"metadata": {"labels": labels(spec), "annotations": annotations},
                             "spec": template_spec}}}
