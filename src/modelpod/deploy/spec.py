"""What a Kubernetes deployment of a pod is: one frozen record, checked once, before anything renders."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelpod.errors import UsageError

AUTOSCALERS = ("hpa", "keda", "cpu", "none")
CANARY_MODES = ("auto", "gateway", "server")
# Both pods of an in-server canary live in every replica: above this, two Deployments are cheaper.
SERVER_CANARY_MAX_BYTES = 1024**3
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# The longest suffix a name gets ("-canary"), so every derived name stays a 63-character label.
_SUFFIX = len("-canary")


@dataclass(frozen=True)
class PodFacts:
    """What the renderer needs to know of a pod (from the store or the image's annotations)."""

    name: str
    version: int | None
    digest: str
    size: int = 0  # bytes of all files
    framework: str = ""
    requirements: tuple[str, ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float = 30.0

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}" if self.version is not None else self.name


@dataclass(frozen=True)
class Canary:
    pod: PodFacts
    image: str
    weight: int  # percent of traffic, 1..99
    mode: str = "auto"  # auto | gateway | server

    def chosen(self, stable: PodFacts) -> tuple[str, str]:
        """(gateway | server, why)."""
        if self.mode != "auto":
            return self.mode, f"asked for with --canary-mode {self.mode}"
        total = stable.size + self.pod.size
        if stable.name != self.pod.name:
            return "gateway", f"the pods have different names ({stable.name}, {self.pod.name}): a route splits one name"
        if stable.framework != self.pod.framework or sorted(stable.requirements) != sorted(self.pod.requirements):
            return "gateway", "the two pods need different frameworks or requirements, so one image cannot hold both"
        if total > SERVER_CANARY_MAX_BYTES:
            return "gateway", (f"the two pods hold {total / 1024**2:.0f} MiB together, more than "
                               f"{SERVER_CANARY_MAX_BYTES // 1024**2} MiB to keep in every replica")
        held = f"{total / 1024**2:.1f} MiB" if total >= 1024**2 else f"{total / 1024:.0f} KiB"
        return "server", f"the two pods hold {held} together: one Deployment serves both and its server splits"


@dataclass(frozen=True)
class BatchJob:
    """An Indexed Job running ``modelpod batch`` over ``shards`` shards, one per completion index."""

    input: str
    output: str
    shards: int = 1
    parallelism: int | None = None
    volume_claim: str | None = None  # a PersistentVolumeClaim mounted at /data
    args: tuple[str, ...] = ()
    backoff_per_index: int = 3


@dataclass(frozen=True)
class DeploySpec:
    name: str
    image: str
    pod: PodFacts
    namespace: str | None = None
    replicas: int = 2
    min_replicas: int | None = None  # None: replicas
    max_replicas: int = 10
    target_inflight: float = 4.0
    autoscaler: str = "hpa"
    scale_to_zero: bool = False
    cpu: str | None = None
    memory: str | None = None
    gpu: int = 0
    token_secret: str | None = None
    tls_secret: str | None = None  # a kubernetes.io/tls Secret (tls.crt, tls.key): the server speaks TLS
    canary: Canary | None = None
    kserve: bool = False
    service_monitor: bool = False
    job: BatchJob | None = None
    gateway: str = "modelpod"  # NAME or NAMESPACE/NAME of the Gateway an HTTPRoute attaches to
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    python: str = "python3"  # the image's interpreter (the builder knows it; else from PATH)
    http_port: int = 8080
    grpc_port: int = 8081
    grpc: bool = True  # False: REST only (``serve --no-grpc``), no gRPC port anywhere
    drain_timeout_s: float = 30.0
    pre_stop_s: int = 5
    openshift: bool = False  # leave the user and group to the platform (arbitrary UID, group 0)
    pull_secret: str | None = None

    @property
    def minimum(self) -> int:
        return self.replicas if self.min_replicas is None else self.min_replicas

    @property
    def grace_s(self) -> int:
        """Longer than the preStop pause plus the server's drain, with room to close."""
        return int(self.pre_stop_s + self.drain_timeout_s + 10)

    def check(self, *, apply: bool = False) -> DeploySpec:
        """Refuse values that would render objects a cluster rejects or that cannot work; returns self."""
        label(self.name, "--name", longest=63 - _SUFFIX)
        if not self.name[0].isalpha():
            raise UsageError(f"--name {self.name!r}: a Service name must start with a letter")
        if self.namespace is not None:
            label(self.namespace, "--namespace")
        if self.token_secret is not None:
            label(self.token_secret, "--token-secret", longest=253)
        if self.tls_secret is not None:
            label(self.tls_secret, "--tls-secret", longest=253)
        if self.autoscaler not in AUTOSCALERS:
            raise UsageError(f"--autoscaler {self.autoscaler!r}: use one of {', '.join(AUTOSCALERS)}")
        if self.replicas < 0 or self.max_replicas < 1:
            raise UsageError("--replicas must be >= 0 and --max >= 1")
        if self.replicas == 0 and not self.scale_to_zero:
            raise UsageError("--replicas 0 serves nothing: use --scale-to-zero (with --autoscaler keda), or >= 1")
        if self.minimum == 0 and not self.scale_to_zero:
            raise UsageError("--min 0 needs --scale-to-zero (with --autoscaler keda)")
        if self.minimum < 0:
            raise UsageError("--min must be >= 0")
        if self.scale_to_zero and self.autoscaler != "keda":
            raise UsageError(f"--scale-to-zero needs --autoscaler keda (an HPA cannot scale to zero), "
                             f"not {self.autoscaler}")
        if self.autoscaler == "keda" and self.namespace is None and not (self.kserve or self.job):
            raise UsageError("--autoscaler keda needs --namespace: KEDA's Prometheus query names it")
        if self.autoscaler != "none" and self.minimum > self.max_replicas:
            raise UsageError(f"--min {self.minimum} is more than --max {self.max_replicas}")
        if not 0 < self.drain_timeout_s <= 3600:
            raise UsageError("--drain-timeout must be > 0 and at most 3600 seconds")
        if self.target_inflight <= 0:
            raise UsageError("--target-inflight must be > 0")
        if self.gpu < 0:
            raise UsageError("--gpu must be >= 0")
        for flag, value in (("--cpu", self.cpu), ("--memory", self.memory)):
            if value is not None and not _QUANTITY.fullmatch(value):
                raise UsageError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 2Gi)")
        for flag, port in (("--port", self.http_port), ("--grpc-port", self.grpc_port)):
            if not 1 <= port <= 65535:
                raise UsageError(f"{flag} {port}: not a port")
        if self.grpc and self.http_port == self.grpc_port:
            raise UsageError("--port and --grpc-port must differ")
        images = [("--image", self.image)] + ([("--canary image", self.canary.image)] if self.canary else [])
        for flag, image in images:
            if not image or any(c.isspace() for c in image):
                raise UsageError(f"{flag} {image!r} is not an image reference")
            if apply and not DIGEST.search(image):
                raise UsageError(f"{flag} {image}: --apply needs an image pinned by digest (IMAGE@sha256:...), "
                                 "so every replica runs the same bytes; use --push or add the digest")
        if self.canary is not None and (self.kserve or self.job is not None):
            raise UsageError("--canary splits a served Deployment: it does not go with "
                             + ("--kserve" if self.kserve else "--job"))
        if self.kserve and self.job is not None:
            raise UsageError("--kserve and --job render different things: choose one")
        if self.canary is not None:
            if not 1 <= self.canary.weight <= 99:
                raise UsageError(f"--canary weight {self.canary.weight}: use 1..99 (percent)")
            if self.canary.mode not in CANARY_MODES:
                raise UsageError(f"--canary-mode {self.canary.mode!r}: use one of {', '.join(CANARY_MODES)}")
            if self.canary.pod.digest == self.pod.digest:
                raise UsageError("--canary names the same pod as the stable one")
        if self.job is not None:
            if self.job.shards < 1:
                raise UsageError("--shards must be >= 1")
            if self.job.parallelism is not None and self.job.parallelism < 1:
                raise UsageError("--parallelism must be >= 1")
            if self.job.volume_claim is not None:
                label(self.job.volume_claim, "--job-volume", longest=253)
        return self


def label(value: str, flag: str, longest: int = 63) -> str:
    """``value`` if it is a DNS-1123 label (lower-case letters, digits, '-') of at most ``longest`` characters."""
    if not _DNS1123.fullmatch(value) or len(value) > longest:
        raise UsageError(f"{flag} {value!r} is not a DNS-1123 label: lower-case letters, digits and '-', "
                         f"starting and ending with a letter or digit, at most {longest} characters")
    return value


def default_name(pod_name: str) -> str:
    """A pod's name made into a DNS-1123 label ('Churn_v2' -> 'churn-v2')."""
    text = re.sub(r"[^a-z0-9-]+", "-", pod_name.lower()).strip("-")
    return text[: 63 - _SUFFIX].rstrip("-") or "model"


def parse_canary(text: str) -> tuple[str, int]:
    """``REF:WEIGHT`` -> (REF, WEIGHT); the last ':' separates the weight."""
    ref, sep, weight = text.rpartition(":")
    if not sep or not ref or not weight.isdigit():
        raise UsageError(f"--canary {text!r}: use REF:WEIGHT, e.g. churn:3:10 for 10 % to churn:3")
    return ref, int(weight)


def split_gateway(text: str) -> tuple[str | None, str]:
    namespace, _, name = text.rpartition("/")
    return namespace or None, name
