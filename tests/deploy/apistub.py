"""A stub of the Kubernetes API's server-side-apply contract, on a real HTTP server on loopback.

No API server can run here, so this stands in for one, and checks what a real one checks: the
bearer token, the path (group, version, namespace, plural, name) against the object sent, the
apply content type, ``fieldManager`` (required for apply), ``force`` (only ``true``/``false``),
field ownership (a field another manager owns and the apply changes is a 409 Conflict unless
forced), and answers with Status bodies as the API does. Deployments get a status the test steers
(rolled out at once, after some polls, or stuck).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

PLURALS = {"serviceaccounts": "ServiceAccount", "configmaps": "ConfigMap", "services": "Service",
           "deployments": "Deployment", "poddisruptionbudgets": "PodDisruptionBudget",
           "networkpolicies": "NetworkPolicy", "horizontalpodautoscalers": "HorizontalPodAutoscaler",
           "jobs": "Job", "scaledobjects": "ScaledObject", "httproutes": "HTTPRoute",
           "servicemonitors": "ServiceMonitor", "inferenceservices": "InferenceService"}
TOKEN = "stub-token-0123456789"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code, **({"details": details} if details else {})}


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Field paths of ``obj``'s scalar values (lists of named items keyed by name, as the API keys them)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(leaves(v, f"{prefix}.{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            key = f"[name={v['name']}]" if isinstance(v, dict) and "name" in v else f"[{i}]"
            out.update(leaves(v, prefix + key))
    else:
        out[prefix] = obj
    return out


@dataclass
class ApiStub:
    seen: list[Seen] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> object
    owners: dict[str, dict[str, str]] = field(default_factory=dict)  # path -> field -> manager
    reject: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # path -> answer
    rollout: str = "done"  # done | stuck | slow
    slow_polls: int = 2
    polls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def patches(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "PATCH"]

    def own(self, path: str, field_path: str, manager: str) -> None:
        """Another manager (kubectl edit, a controller) owns a field of a stored object."""
        self.owners.setdefault(path, {})[field_path] = manager

    # -- the handler's work ------------------------------------------------------------------------
    def handle(self, method: str, url: str, headers: Any, raw: bytes) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        ctype = headers.get("Content-Type")
        body: Any = None
        if raw:
            body = yaml.safe_load(raw.decode()) if ctype == "application/apply-patch+yaml" else json.loads(raw)
        with self.lock:
            self.seen.append(Seen(method, parts.path, query, ctype, body))
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, status(401, "Unauthorized", "Unauthorized")
        if parts.path == "/version":
            return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.4"}
        seg = parts.path.strip("/").split("/")
        if seg[0] == "api":
            api_version, rest = seg[1], seg[2:]
        elif seg[0] == "apis" and len(seg) > 3:
            api_version, rest = f"{seg[1]}/{seg[2]}", seg[3:]
        else:
            return 404, status(404, "NotFound", "the server could not find the requested resource")
        if len(rest) != 4 or rest[0] != "namespaces" or rest[2] not in PLURALS:
            return 404, status(404, "NotFound", "the server could not find the requested resource")
        namespace, kind, name = rest[1], PLURALS[rest[2]], rest[3]
        key = parts.path
        with self.lock:
            if method == "GET":
                return self._get(key, kind, name)
            if method == "PATCH":
                return self._apply(key, api_version, kind, namespace, name, ctype, query, body)
        return 405, status(405, "MethodNotAllowed", f"{method} is not supported here")

    def _get(self, key: str, kind: str, name: str) -> tuple[int, dict[str, Any]]:
        obj = self.objects.get(key)
        if obj is None:
            return 404, status(404, "NotFound", f'{kind.lower()}s "{name}" not found', name=name, kind=kind.lower())
        if kind == "Deployment":
            self._progress(key, obj)
        return 200, obj

    def _progress(self, key: str, obj: dict[str, Any]) -> None:
        want = int(obj["spec"].get("replicas", 1))
        gen = obj["metadata"]["generation"]
        n = self.polls[key] = self.polls.get(key, 0) + 1
        if self.rollout == "stuck":
            obj["status"] = {"observedGeneration": gen, "replicas": want + 1, "updatedReplicas": 1,
                             "availableReplicas": want, "conditions": [{
                                 "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                 "message": f'ReplicaSet "{obj["metadata"]["name"]}-7d9f" has timed out progressing.'}]}
        elif self.rollout == "slow" and n <= self.slow_polls:
            obj["status"] = {"observedGeneration": gen, "replicas": want + 1, "updatedReplicas": n,
                             "availableReplicas": want}
        else:
            obj["status"] = {"observedGeneration": gen, "replicas": want, "updatedReplicas": want,
                             "readyReplicas": want, "availableReplicas": want}

    def _apply(self, key: str, api_version: str, kind: str, namespace: str, name: str, ctype: str | None,
               query: dict[str, list[str]], body: Any) -> tuple[int, dict[str, Any]]:
        if ctype != "application/apply-patch+yaml":
            return 415, status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                               f"- accepted media types include: application/apply-patch+yaml (got {ctype})")
        managers = query.get("fieldManager", [])
        if not managers or not managers[0]:
            return 400, status(400, "BadRequest", "PATCH, PUT and apply requests require a fieldManager")
        force = query.get("force", ["false"])[0]
        if force not in ("true", "false"):
            return 400, status(400, "BadRequest", f"invalid force value {force!r}")
        if not isinstance(body, dict) or body.get("apiVersion") != api_version or body.get("kind") != kind:
            return 400, status(400, "BadRequest", f"apiVersion/kind of the body do not match the URL "
                               f"({api_version} {kind})")
        meta = body.get("metadata") or {}
        if meta.get("name") != name:
            return 400, status(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match "
                               f"the name on the URL ({name})")
        if meta.get("namespace", namespace) != namespace:
            return 400, status(400, "BadRequest", "the namespace of the provided object does not match the "
                               "namespace sent on the request")
        dry = query.get("dryRun", [])
        if dry and dry != ["All"]:
            return 400, status(400, "BadRequest", f"invalid dry run value {dry!r}: only All is supported")
        if key in self.reject:
            return self.reject[key]
        manager = managers[0]
        fields = leaves({k: v for k, v in body.items() if k not in ("apiVersion", "kind")})
        live = self.objects.get(key)
        old = leaves({k: v for k, v in (live or {}).items() if k not in ("apiVersion", "kind", "status")})
        owned = self.owners.setdefault(key, {})
        conflicts = [f for f, v in fields.items() if owned.get(f, manager) != manager and old.get(f) != v]
        if conflicts and force != "true":
            causes = [{"type": "FieldManagerConflict", "message": f'conflict with "{owned[f]}"', "field": f}
                      for f in conflicts]
            return 409, status(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s): "
                               + "; ".join(f'conflict with "{owned[f]}": {f}' for f in conflicts), causes=causes)
        created = live is None
        if dry:  # checked and answered as if applied; nothing is kept
            return (201 if created else 200), json.loads(json.dumps(body))
        for f in list(owned):
            if owned[f] == manager and f not in fields:
                del owned[f]  # fields this manager stopped sending are no longer its own
        owned.update({f: manager for f in fields})
        generation = 1 if created else live["metadata"]["generation"] + (live.get("spec") != body.get("spec"))
        stored = json.loads(json.dumps(body))
        stored["metadata"] = {**meta, "namespace": namespace, "generation": generation,
                              "resourceVersion": str(len(self.seen)),
                              "managedFields": [{"manager": m, "operation": "Apply"}
                                                for m in sorted(set(owned.values()))]}
        if kind == "Deployment" and "replicas" not in stored["spec"]:
            stored["spec"]["replicas"] = (live or {}).get("spec", {}).get("replicas", 1)
        self.objects[key] = stored
        self.polls.pop(key, None)
        return (201 if created else 200), stored


class _Handler(BaseHTTPRequestHandler):
    stub: ApiStub

    def log_message(self, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code, doc = self.server.stub.handle(self.command, self.path, self.headers, raw)  # type: ignore[attr-defined]
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve


def serve(stub: ApiStub, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Run ``stub`` on a loopback port until the generator is closed; yields its URL.

    ``tls``: (certificate, key) to serve HTTPS, as an API server does.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.stub = stub  # type: ignore[attr-defined]
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def kubeconfig(path: Path, server: str, namespace: str = "ml", context: str = "stub",
               ca: Path | None = None) -> Path:
    cluster: dict[str, Any] = {"server": server, **({"certificate-authority": str(ca)} if ca else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": "stub-cluster", "cluster": cluster}],
        "users": [{"name": "stub-user", "user": {"token": TOKEN}}],
        "contexts": [{"name": context, "context": {"cluster": "stub-cluster", "user": "stub-user",
                                                   "namespace": namespace}}],
    }))
    return path
