"""Helpers the deploy tests share: specs of every shape, and where the CRD schemas are."""

from __future__ import annotations

from pathlib import Path

from modelpod.deploy.spec import BatchJob, Canary, DeploySpec, PodFacts

ROOT = Path(__file__).resolve().parents[2]
DIGEST_IMAGE = "127.0.0.1:5000/pods/churn@sha256:" + "c" * 64
CANARY_IMAGE = "127.0.0.1:5000/pods/churn@sha256:" + "d" * 64
CRD_KINDS = {"HTTPRoute": "gateway.networking.k8s.io_httproutes.yaml",
             "ScaledObject": "keda.sh_scaledobjects.yaml",
             "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
             "InferenceService": "serving.kserve.io_inferenceservices.yaml"}


def pod(version: int = 2, size: int = 10_000, digest: str = "a", framework: str = "sklearn") -> PodFacts:
    return PodFacts("churn", version, "sha256:" + digest * 64, size, framework, ("scikit-learn==1.5.2",))


def specs() -> dict[str, DeploySpec]:
    """One spec per shape the renderer knows."""
    base = DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml")
    three = pod(3, digest="b")
    big = pod(3, size=2 * 1024**3, digest="b")
    return {
        "default": base,
        "fixed": DeploySpec("churn", DIGEST_IMAGE, pod(), replicas=3, autoscaler="none"),
        "cpu": DeploySpec("churn", DIGEST_IMAGE, pod(), autoscaler="cpu", min_replicas=1, max_replicas=4),
        "keda-zero": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml", autoscaler="keda", scale_to_zero=True,
                                min_replicas=0, replicas=1),
        "gpu-token-monitor": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml", gpu=1, cpu="4", memory="16Gi",
                                        token_secret="churn-token", service_monitor=True),
        "canary-server": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml",
                                    canary=Canary(three, CANARY_IMAGE, 10)),
        "canary-gateway": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml", gateway="infra/public",
                                     canary=Canary(big, CANARY_IMAGE, 25)),
        "canary-keda": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml", autoscaler="keda",
                                  canary=Canary(three, CANARY_IMAGE, 5, "gateway")),
        "kserve": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml", kserve=True),
        "tls-token-monitor": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml", tls_secret="churn-tls",
                                        token_secret="churn-token", service_monitor=True,
                                        canary=Canary(three, CANARY_IMAGE, 10)),
        "kserve-tls": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml", kserve=True, tls_secret="churn-tls"),
        "openshift": DeploySpec("churn", DIGEST_IMAGE, pod(), openshift=True),
        "rest-only": DeploySpec("churn", DIGEST_IMAGE, pod(), grpc=False, http_port=9000),
        "grpc-port": DeploySpec("churn", DIGEST_IMAGE, pod(), grpc_port=9001),
        "job": DeploySpec("churn", DIGEST_IMAGE, pod(), namespace="ml",
                          job=BatchJob("/data/in/*.parquet", "/data/out", 8, 4, "scores")),
    }


def find_crds() -> Path | None:
    """``shared/specs/kubernetes`` beside the checkout or beside any folder above it (CI: ../shared)."""
    for folder in (ROOT, *ROOT.parents):
        candidate = folder / "shared" / "specs" / "kubernetes"
        if all((candidate / f).is_file() for f in CRD_KINDS.values()):
            return candidate
    return None
