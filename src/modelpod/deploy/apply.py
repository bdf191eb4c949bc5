"""Server-side apply of rendered objects, rollout waits, status and rollback (the ``kubernetes`` extra).

The official client reads the kubeconfig (contexts, certificates, tokens, exec plugins) and carries
the requests; each object is sent as ``PATCH`` with ``application/apply-patch+yaml`` and field
manager ``modelpod``, so re-applying is idempotent and fields other managers own are left alone
(a conflict is reported, or taken over with ``force``).

Rollback history lives on the Deployment itself: the annotation ``modelpod.dev/history`` holds the
applied bodies of its last images (gzip + base64), so a rollback re-applies exactly what was
applied before, as the same field manager.
"""

from __future__ import annotations

import base64
import gzip
import importlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from modelpod.deploy.kubernetes import ANNOTATION_DIGEST, ANNOTATION_IMAGE, CONTAINER
from modelpod.deploy.output import to_yaml
from modelpod.errors import ClusterError, MissingExtraError, NotFoundError, UsageError

FIELD_MANAGER = "modelpod"
APPLY_TYPE = "application/apply-patch+yaml"
HISTORY = "modelpod.dev/history"
HISTORY_LENGTH = 5
Obj = dict[str, Any]

# kind -> (plural, namespaced); the group/version comes from the object's apiVersion.
KINDS: dict[str, tuple[str, bool]] = {
    "ServiceAccount": ("serviceaccounts", True), "ConfigMap": ("configmaps", True), "Service": ("services", True),
    "Deployment": ("deployments", True), "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "NetworkPolicy": ("networkpolicies", True), "HorizontalPodAutoscaler": ("horizontalpodautoscalers", True),
    "Job": ("jobs", True), "ScaledObject": ("scaledobjects", True), "HTTPRoute": ("httproutes", True),
    "ServiceMonitor": ("servicemonitors", True), "InferenceService": ("inferenceservices", True),
    "ReplicaSet": ("replicasets", True),
}


@dataclass(frozen=True)
class ApiError(Exception):
    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


def path_of(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    plural, namespaced = KINDS[kind]
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    where = f"/namespaces/{quote(namespace, safe='')}" if namespaced else ""
    return f"{root}{where}/{plural}" + (f"/{quote(name, safe='')}" if name else "")


class Cluster:
    """One cluster, reached through a kubeconfig context; every call is bounded by ``timeout_s``."""

    def __init__(self, context: str | None = None, kubeconfig: str | None = None, timeout_s: float = 10.0) -> None:
        try:
            client: Any = importlib.import_module("kubernetes.client")
            config: Any = importlib.import_module("kubernetes.config")
        except ImportError:
            raise MissingExtraError("kubernetes", "kubernetes", "--apply and deploy status/rollback") from None
        import yaml

        self.timeout_s = timeout_s
        cfg = client.Configuration()
        where = f" {kubeconfig}" if kubeconfig else ""
        for path in (kubeconfig or "").split(":"):
            if path and not Path(path).expanduser().is_file():
                raise ClusterError(f"no kubeconfig file {path}")
        try:
            contexts, active = config.list_kube_config_contexts(kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), None) if context else active
            if chosen is None:
                names = ", ".join(c["name"] for c in contexts) or "none"
                raise ClusterError(f"no context {context!r} in the kubeconfig (it has: {names})")
            self.context = str(chosen["name"])
            self.default_namespace = str((chosen.get("context") or {}).get("namespace") or "default")
            config.load_kube_config(config_file=kubeconfig, context=self.context, client_configuration=cfg)
        except (config.ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError) as exc:
            text = str(exc).replace("\n", " ")
            raise ClusterError(f"cannot use the kubeconfig{where}{f' (context {context!r})' if context else ''}: "
                               f"{text}") from None
        cfg.retries = False  # an unreachable cluster fails at once, not after urllib3's retries
        self.host = str(cfg.host)
        self._api = client.ApiClient(configuration=cfg)
        self._exception = client.ApiException
        self.last_status = 0

    def request(self, method: str, path: str, query: Mapping[str, str] | None = None, body: str | None = None,
                content_type: str = "application/json") -> Obj:
        """The decoded JSON answer; an API refusal raises ``ApiError``, no answer ``ClusterError``."""
        import urllib3

        url = self.host.rstrip("/") + path + (f"?{urlencode(dict(query))}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": "modelpod"}
        if body is not None:
            headers["Content-Type"] = content_type
        for auth in self._api.configuration.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        try:
            resp = self._api.rest_client.request(method, url, headers=headers, body=body,
                                                 _request_timeout=(self.timeout_s, self.timeout_s))
            if getattr(resp, "data", None) is None and hasattr(resp, "read"):
                resp.read()
            status, data = int(resp.status), resp.data
        except self._exception as exc:
            status, data = int(exc.status or 0), exc.body or b""
            if status == 0:
                raise ClusterError(f"cannot reach the cluster of context {self.context!r} at {self.host}: "
                                   f"{exc.reason}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ClusterError(f"cannot reach the cluster of context {self.context!r} at {self.host} "
                               f"(within {self.timeout_s:g} s): {reason}") from None
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data or "")
        try:
            doc = json.loads(text) if text.strip() else {}
        except ValueError:
            doc = {"message": text.strip()[:500]}
        self.last_status = status
        if status >= 400:
            raise ApiError(status, str(doc.get("reason") or "Failure"), _status_message(doc, text))
        return doc if isinstance(doc, dict) else {}

    def check(self) -> str:
        """The server's version (``/version``): proves the cluster answers before anything is applied."""
        try:
            info = self.request("GET", "/version")
        except ApiError as exc:
            raise ClusterError(f"the cluster of context {self.context!r} at {self.host} refused /version: {exc}") \
                from None
        return str(info.get("gitVersion") or "unknown")

    def get(self, obj_path: str) -> Obj | None:
        try:
            return self.request("GET", obj_path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, obj: Mapping[str, Any], namespace: str, *, force: bool = False, dry_run: bool = False) -> Obj:
        """One server-side apply; ``dry_run``: the API checks and answers, and stores nothing."""
        path = path_of(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"])
        query = {"fieldManager": FIELD_MANAGER, **({"force": "true"} if force else {}),
                 **({"dryRun": "All"} if dry_run else {})}
        return self.request("PATCH", path, query, to_yaml(obj), APPLY_TYPE)


def _status_message(doc: Mapping[str, Any], text: str) -> str:
    """A Status body's message plus its causes (the fields the API names)."""
    message = str(doc.get("message") or text.strip()[:500] or "no message")
    causes = (doc.get("details") or {}).get("causes") or []
    extra = [f"{c.get('field', '')}: {c.get('message', '')}".strip(": ") for c in causes
             if isinstance(c, Mapping) and c.get("message") and str(c.get("message")) not in message]
    return message + (f" ({'; '.join(extra)})" if extra else "")


def describe(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata']['name']}"


# -- apply ----------------------------------------------------------------------------------------
@dataclass
class ApplyReport:
    namespace: str
    context: str
    applied: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    failed: str | None = None
    reason: str | None = None
    not_applied: list[str] = field(default_factory=list)
    rollout: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "context": self.context, "dry_run": self.dry_run,
                "applied": self.applied,
                "created": self.created, "failed": self.failed, "reason": self.reason,
                "not_applied": self.not_applied, "rollout": self.rollout}


def apply_all(cluster: Cluster, objects: Sequence[Obj], namespace: str | None = None, *,
              force: bool = False, dry_run: bool = False) -> ApplyReport:
    """Apply in order; stop at the first refusal and say what was applied, what failed, what was not."""
    ns = namespace or cluster.default_namespace
    report = ApplyReport(ns, cluster.context, dry_run=dry_run)
    cluster.check()
    for i, obj in enumerate(objects):
        body = with_history(cluster, obj, ns) if obj["kind"] == "Deployment" else obj
        try:
            cluster.apply(body, ns, force=force, dry_run=dry_run)
        except ApiError as exc:
            report.failed, report.reason = describe(obj), str(exc)
            report.not_applied = [describe(o) for o in objects[i + 1:]]
            hint = " (rerun with --force-conflicts to take those fields over)" if exc.status == 409 else ""
            raise HalfApplied(report, f"{describe(obj)} in namespace {ns} was refused: {exc}{hint}") from None
        report.applied.append(describe(obj))
        if cluster.last_status == 201:
            report.created.append(describe(obj))
    return report


class HalfApplied(ClusterError):
    """Some objects were applied and one was refused; ``report`` says which."""

    def __init__(self, report: ApplyReport, message: str) -> None:
        done = ", ".join(report.applied) or "nothing"
        rest = f"; not applied: {', '.join(report.not_applied)}" if report.not_applied else ""
        super().__init__(f"{message}. Applied before it: {done}{rest}")
        self.report = report


def container_image(deployment: Mapping[str, Any]) -> str | None:
    for c in ((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []:
        if c.get("name") == CONTAINER:
            return str(c.get("image"))
    return None


def read_history(live: Mapping[str, Any] | None) -> list[Obj]:
    raw = ((live or {}).get("metadata") or {}).get("annotations", {}).get(HISTORY)
    if not raw:
        return []
    try:
        data = json.loads(gzip.decompress(base64.b64decode(raw)))
    except (ValueError, OSError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def encode_history(bodies: Sequence[Mapping[str, Any]]) -> str:
    raw = json.dumps(list(bodies), sort_keys=True, separators=(",", ":")).encode()
    return base64.b64encode(gzip.compress(raw, mtime=0)).decode()


def _bare(obj: Mapping[str, Any]) -> Obj:
    """``obj`` without its history annotation (what a history entry holds)."""
    body = json.loads(json.dumps(obj))
    annotations = body.get("metadata", {}).get("annotations") or {}
    annotations.pop(HISTORY, None)
    return dict(body)


def with_history(cluster: Cluster, obj: Obj, namespace: str) -> Obj:
    """``obj`` with the history annotation: the live one's, plus ``obj`` itself when its image is new."""
    live = cluster.get(path_of(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"]))
    history = read_history(live)
    bare = _bare(obj)
    if history and container_image(history[-1]) == container_image(bare):
        history[-1] = bare  # same image, other settings: the entry follows the settings
    else:
        history.append(bare)
    body = json.loads(json.dumps(obj))
    body["metadata"].setdefault("annotations", {})[HISTORY] = encode_history(history[-HISTORY_LENGTH:])
    return dict(body)


# -- rollout, status, rollback --------------------------------------------------------------------
def rollout_state(dep: Mapping[str, Any]) -> tuple[str, str]:
    """(done | progressing | failed, words), from the Deployment's status as ``kubectl rollout status`` reads it."""
    meta, spec, status = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "failed", f"rollout stuck: {cond.get('message') or 'progress deadline exceeded'}"
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return "progressing", "waiting for the controller to see the new spec"
    want = int(spec.get("replicas", 1))
    updated, ready = int(status.get("updatedReplicas") or 0), int(status.get("availableReplicas") or 0)
    total = int(status.get("replicas") or 0)
    if updated < want:
        return "progressing", f"{updated} of {want} replicas updated"
    if total > updated:
        return "progressing", f"{total - updated} old replicas still terminating"
    if ready < updated:
        return "progressing", f"{ready} of {updated} updated replicas available"
    return "done", f"{ready} of {want} replicas available"


def wait_rollout(cluster: Cluster, namespace: str, names: Sequence[str], timeout_s: float = 600.0,
                 poll_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 pause: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Poll each Deployment until rolled out (every 0.1 s at first, then up to every ``poll_s``); a stuck
    or timed-out rollout raises, saying where it stood."""
    deadline = clock() + timeout_s
    done: dict[str, str] = {}
    words = "not looked at yet"
    delay = 0.1
    while True:
        for name in names:
            if name in done:
                continue
            dep = cluster.get(path_of("apps/v1", "Deployment", namespace, name))
            if dep is None:
                raise ClusterError(f"Deployment {namespace}/{name} is gone while waiting for its rollout")
            state, words = rollout_state(dep)
            if state == "failed":
                raise ClusterError(f"Deployment {namespace}/{name}: {words}; the previous ReplicaSet still "
                                   f"serves: `modelpod deploy rollback {name}` returns to the previous image")
            if state == "done":
                done[name] = words
        if len(done) == len(names):
            return done
        if clock() >= deadline:
            waiting = [n for n in names if n not in done]
            raise ClusterError(f"rollout of {', '.join(waiting)} not finished after {timeout_s:g} s ({words}); "
                               "the objects are applied and the rollout goes on in the cluster")
        pause(min(delay, max(0.0, deadline - clock())))
        delay = min(delay * 2, poll_s)


def status(cluster: Cluster, name: str, namespace: str | None = None) -> dict[str, Any]:
    ns = namespace or cluster.default_namespace
    out: dict[str, Any] = {"name": name, "namespace": ns, "context": cluster.context, "deployments": []}
    found = False
    for dep_name in (name, f"{name}-canary"):
        dep = cluster.get(path_of("apps/v1", "Deployment", ns, dep_name))
        if dep is None:
            continue
        found = True
        state, words = rollout_state(dep)
        st = dep.get("status") or {}
        annotations = (dep.get("metadata") or {}).get("annotations") or {}
        out["deployments"].append({
            "name": dep_name, "image": container_image(dep), "pod_digest": annotations.get(ANNOTATION_DIGEST),
            "replicas": int((dep.get("spec") or {}).get("replicas", 1)), "ready": int(st.get("readyReplicas") or 0),
            "updated": int(st.get("updatedReplicas") or 0), "rollout": state, "detail": words,
            "history": [container_image(h) for h in read_history(dep)],
        })
        hpa = cluster.get(path_of("autoscaling/v2", "HorizontalPodAutoscaler", ns, dep_name)) \
            or cluster.get(path_of("autoscaling/v2", "HorizontalPodAutoscaler", ns, f"keda-hpa-{dep_name}"))
        if hpa is not None:
            hs = hpa.get("status") or {}
            out["deployments"][-1]["autoscaler"] = {
                "min": (hpa.get("spec") or {}).get("minReplicas"), "max": (hpa.get("spec") or {}).get("maxReplicas"),
                "current": hs.get("currentReplicas"), "desired": hs.get("desiredReplicas")}
    if not found:
        raise NotFoundError(f"no Deployment {name} in namespace {ns} (context {cluster.context})")
    return out


def rollback(cluster: Cluster, name: str, namespace: str | None = None, *, force: bool = False) -> dict[str, Any]:
    """Re-apply the Deployment's previous entry in its history (the image before the current one)."""
    ns = namespace or cluster.default_namespace
    cluster.check()
    path = path_of("apps/v1", "Deployment", ns, name)
    live = cluster.get(path)
    if live is None:
        raise NotFoundError(f"no Deployment {name} in namespace {ns} (context {cluster.context})")
    history = read_history(live)
    current = container_image(live)
    while history and container_image(history[-1]) == current:
        history.pop()
    if not history:
        raise UsageError(f"Deployment {ns}/{name} has no earlier image in its history "
                         f"(annotation {HISTORY}); nothing to roll back to")
    target = json.loads(json.dumps(history[-1]))
    target["metadata"].setdefault("annotations", {})[HISTORY] = encode_history(history)
    try:
        cluster.apply(target, ns, force=force)
    except ApiError as exc:
        raise ClusterError(f"rollback of Deployment {ns}/{name} was refused: {exc}") from None
    return {"name": name, "namespace": ns, "from": current, "to": container_image(target),
            "pod_digest": (target["metadata"].get("annotations") or {}).get(ANNOTATION_DIGEST),
            "image_annotation": (target["metadata"].get("annotations") or {}).get(ANNOTATION_IMAGE)}
