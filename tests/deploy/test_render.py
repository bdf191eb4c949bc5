"""The renderer: every object validates, the objects agree with each other, the bytes are deterministic."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployutil import CANARY_IMAGE, DIGEST_IMAGE, pod, specs

from modelpod.deploy import output
from modelpod.deploy.kubernetes import POD_DIR, render
from modelpod.deploy.spec import Canary, DeploySpec, PodFacts
from modelpod.errors import UsageError

Obj = dict[str, Any]
SPECS = specs()


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_templates(objects: list[Obj]) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "Job")}


@pytest.mark.parametrize("shape", sorted(SPECS))
def test_every_object_validates(shape: str, validate_object: Callable[[Obj], list[str]]) -> None:
    objects = render(SPECS[shape].check(apply=True))
    problems = [p for o in objects for p in validate_object(o)]
    assert problems == []
    # The validators can fail: a misspelt field is caught in core kinds and in custom resources.
    for obj in (objects[-1], next(o for o in objects if o["kind"] == "ServiceAccount")):
        broken = {**obj, "spec": {**obj.get("spec", {}), "replicaz": 1}}
        assert validate_object(broken), f"{obj['kind']} with an unknown field passed"


def test_custom_resources_are_checked_against_their_crds(validate_object: Callable[[Obj], list[str]]) -> None:
    kinds = {o["kind"] for spec in SPECS.values() for o in render(spec)}
    assert {"HTTPRoute", "ScaledObject", "ServiceMonitor", "InferenceService", "Job"} <= kinds
    route = one(render(SPECS["canary-gateway"]), "HTTPRoute")
    bad = {**route, "spec": {**route["spec"], "rules": [{"backendRefs": [{"name": "x", "weight": -1}]}]}}
    assert any("weight" in p or "-1" in p for p in validate_object(bad))


@pytest.mark.parametrize("shape", sorted(SPECS))
def test_selectors_ports_probes_and_targets_agree(shape: str) -> None:
    spec = SPECS[shape]
    objects = render(spec)
    templates = pod_templates(objects)
    for name, template in templates.items():
        labels = template["metadata"]["labels"]
        container = template["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in ports, f"{name} {probe} names no port"
        for spread in template["spec"].get("topologySpreadConstraints", []):
            assert matches(spread["labelSelector"]["matchLabels"], labels)
        assert template["spec"]["serviceAccountName"] == spec.name
        assert one(objects, "ServiceAccount", spec.name)
        mounts = {m["name"] for c in template["spec"]["containers"] + template["spec"].get("initContainers", [])
                  for m in c.get("volumeMounts", [])}
        assert mounts == {v["name"] for v in template["spec"]["volumes"]}
    for dep in by_kind(objects, "Deployment"):
        # A Deployment's selector must select its own template, and no other Deployment's.
        sel = dep["spec"]["selector"]["matchLabels"]
        assert [n for n, t in templates.items() if matches(sel, t["metadata"]["labels"])] == [dep["metadata"]["name"]]
    for svc in by_kind(objects, "Service"):
        selected = [n for n, t in templates.items() if matches(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert selected == [svc["metadata"]["name"]], f"Service {svc['metadata']['name']} selects {selected}"
        container_ports = {p["name"] for p in templates[selected[0]]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        selected = [n for n, t in templates.items() if matches(pdb["spec"]["selector"]["matchLabels"],
                                                               t["metadata"]["labels"])]
        assert selected == [spec.name]
        assert pdb["spec"]["minAvailable"] < one(objects, "HorizontalPodAutoscaler", spec.name)["spec"]["minReplicas"] \
            if by_kind(objects, "HorizontalPodAutoscaler") else True
    for policy in by_kind(objects, "NetworkPolicy"):
        sel = policy["spec"]["podSelector"]["matchLabels"]
        assert all(matches(sel, t["metadata"]["labels"]) for t in templates.values())
        allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert allowed == {p["name"] for t in templates.values() for p in t["spec"]["containers"][0]["ports"]}
    for scaler in by_kind(objects, "HorizontalPodAutoscaler") + by_kind(objects, "ScaledObject"):
        ref = scaler["spec"]["scaleTargetRef"]
        target = one(objects, ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], "an autoscaled Deployment must leave replicas to the autoscaler"
    for route in by_kind(objects, "HTTPRoute"):
        for backend in route["spec"]["rules"][0]["backendRefs"]:
            svc = one(objects, "Service", backend["name"])
            assert backend["port"] in {p["port"] for p in svc["spec"]["ports"]}
        assert sum(b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]) == 100
    for monitor in by_kind(objects, "ServiceMonitor"):
        sel = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in by_kind(objects, "Service") if matches(sel, s["metadata"]["labels"])]
        assert services and all(monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in s["spec"]["ports"]}
                                for s in services)


def test_deployment_defaults_the_issue_names() -> None:
    spec = SPECS["gpu-token-monitor"]
    objects = render(spec)
    dep = one(objects, "Deployment", "churn")
    t = dep["spec"]["template"]
    c = t["spec"]["containers"][0]
    assert c["image"] == DIGEST_IMAGE
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == spec.pre_stop_s
    assert t["spec"]["terminationGracePeriodSeconds"] > spec.pre_stop_s + spec.drain_timeout_s
    env = {e["name"]: e for e in c["env"]}
    assert float(env["MODELPOD_DRAIN_TIMEOUT_S"]["value"]) == spec.drain_timeout_s
    assert env["MODELPOD_TOKEN_FILE"]["value"] == "/var/run/secrets/modelpod/token"
    assert {"name": "token", "mountPath": "/var/run/secrets/modelpod", "readOnly": True} in c["volumeMounts"]
    secret = next(v for v in t["spec"]["volumes"] if v["name"] == "token")["secret"]
    assert secret["secretName"] == "churn-token" and secret["items"] == [{"key": "token", "path": "token"}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["cpu"] == "4"
    assert c["resources"]["limits"]["memory"] == "16Gi"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert t["spec"]["securityContext"]["runAsNonRoot"] and t["spec"]["securityContext"]["runAsUser"] == 65532
    assert t["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {s["topologyKey"] for s in t["spec"]["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    labels = t["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "churn" and labels["modelpod.dev/version"] == "2"
    assert labels["modelpod.dev/digest"] == "a" * 16
    assert t["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert t["metadata"]["annotations"]["modelpod.dev/digest"] == "sha256:" + "a" * 64
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert t["spec"]["automountServiceAccountToken"] is False
    svc = one(objects, "Service")
    assert {p["name"]: p["appProtocol"] for p in svc["spec"]["ports"]} == {"http": "http", "grpc": "kubernetes.io/h2c"}
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "modelpod_inflight_requests"
    assert hpa["spec"]["metrics"][1]["resource"]["name"] == "cpu"  # the fallback
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"]["name"] == "churn-token"


def test_canary_mode_is_chosen_by_size() -> None:
    small = render(SPECS["canary-server"])
    assert len(by_kind(small, "Deployment")) == 1 and not by_kind(small, "HTTPRoute")
    dep = one(small, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["serve", "churn@stable", "churn@canary", "--config", "/etc/modelpod/config.yaml"]
    stable, canary = dep["spec"]["template"]["spec"]["initContainers"]
    assert (stable["image"], canary["image"]) == (DIGEST_IMAGE, CANARY_IMAGE)
    assert stable["command"][1:] == ["-m", "modelpod.deploy.seed"] and canary["args"][-2:] == ["--alias", "canary"]
    config = yaml.safe_load(one(small, "ConfigMap")["data"]["config.yaml"])
    assert config == {"routes": {"churn": {"variants": [{"model": "churn@stable", "weight": 90},
                                                        {"model": "churn@canary", "weight": 10}]}}}
    big = render(SPECS["canary-gateway"])
    assert [d["metadata"]["name"] for d in by_kind(big, "Deployment")] == ["churn", "churn-canary"]
    route = one(big, "HTTPRoute")
    assert route["spec"]["parentRefs"][0] == {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                              "name": "public", "namespace": "infra"}
    assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [
        ("churn", 75), ("churn-canary", 25)]
    assert one(big, "Deployment", "churn-canary")["spec"]["template"]["spec"]["containers"][0]["image"] == CANARY_IMAGE
    mode, why = SPECS["canary-gateway"].canary.chosen(SPECS["canary-gateway"].pod)  # type: ignore[union-attr]
    assert mode == "gateway" and "MiB" in why
    other = Canary(pod(3, digest="b", framework="onnx"), CANARY_IMAGE, 10)
    assert other.chosen(pod())[0] == "gateway"
    renamed = Canary(PodFacts("churn-next", 1, "sha256:" + "e" * 64, 10), CANARY_IMAGE, 10)
    assert renamed.chosen(pod())[0] == "gateway"


def test_keda_scale_to_zero_and_job_and_kserve() -> None:
    keda = one(render(SPECS["keda-zero"]), "ScaledObject")
    assert keda["spec"]["minReplicaCount"] == 0 and keda["spec"]["scaleTargetRef"]["name"] == "churn"
    query = keda["spec"]["triggers"][0]["metadata"]["query"]
    assert 'namespace="ml"' in query and "modelpod_inflight_requests" in query
    assert re.fullmatch(query.split('pod=~"')[1].split('"')[0], "churn-5d4f8b7c9-x2x7q")
    assert not re.fullmatch(query.split('pod=~"')[1].split('"')[0], "churn-canary-5d4f8b7c9-x2x7q")
    job = one(render(SPECS["job"]), "Job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 8
    assert job["spec"]["parallelism"] == 4
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["batch", POD_DIR] and c["args"][c["args"].index("--shards") + 1] == "8"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    isvc = one(render(SPECS["kserve"]), "InferenceService")
    assert isvc["spec"]["predictor"]["containers"][0]["image"] == DIGEST_IMAGE


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    for shape, spec in SPECS.items():
        assert output.stream(render(spec)) == output.stream(render(specs()[shape])), shape
    a, b = tmp_path / "a", tmp_path / "b"
    output.write_directory(a, render(SPECS["canary-gateway"]))
    output.write_directory(b, render(specs()["canary-gateway"]))
    assert {p.name: p.read_bytes() for p in a.iterdir()} == {p.name: p.read_bytes() for p in b.iterdir()}
    # A re-render with fewer objects removes the files it no longer renders, and keeps foreign ones.
    (a / "notes.txt").write_text("mine")
    output.write_directory(a, render(SPECS["default"]))
    names = {p.name for p in a.iterdir()}
    assert "httproute-churn.yaml" not in names and "notes.txt" in names


def _kustomize() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    pytest.fail("neither kubectl nor kustomize is installed (.ci/setup-system.sh installs kubectl)")


@pytest.mark.parametrize("shape", ["default", "canary-gateway", "canary-server", "job"])
def test_kubectl_kustomize_renders_the_directory(shape: str, tmp_path: Path) -> None:
    objects = render(SPECS[shape])
    output.write_directory(tmp_path, objects)
    proc = subprocess.run([*_kustomize(), str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(built, key=key) == sorted(objects, key=key)


def test_the_adapter_rule_validates(validate_object: Callable[[Obj], list[str]]) -> None:
    from modelpod.deploy.kubernetes import adapter_rule

    rule = adapter_rule(SPECS["default"])
    assert validate_object(rule) == []
    config = yaml.safe_load(rule["data"]["config.yaml"])
    hpa = one(render(SPECS["default"]), "HorizontalPodAutoscaler")
    assert config["rules"][0]["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]


def test_yaml_stream_round_trips() -> None:
    objects = render(SPECS["canary-server"])
    assert [d for d in yaml.safe_load_all(output.stream(objects))] == objects


@pytest.mark.parametrize(("changes", "message"), [
    ({"replicas": 0}, "--replicas 0"),
    ({"min_replicas": 0}, "--min 0 needs --scale-to-zero"),
    ({"min_replicas": 5, "max_replicas": 3}, "--min 5 is more than --max 3"),
    ({"autoscaler": "vpa"}, "--autoscaler 'vpa'"),
    ({"name": "Churn_Model"}, "not a DNS-1123 label"),
    ({"name": "-churn"}, "not a DNS-1123 label"),
    ({"name": "a" * 60}, "at most 56"),
    ({"name": "9lives"}, "must start with a letter"),
    ({"namespace": "ML"}, "--namespace 'ML'"),
    ({"scale_to_zero": True}, "--scale-to-zero needs --autoscaler keda"),
    ({"memory": "2GB"}, "not a Kubernetes quantity"),
    ({"target_inflight": 0}, "--target-inflight"),
    ({"canary": Canary(pod(3, digest="b"), CANARY_IMAGE, 100)}, "weight 100"),
    ({"canary": Canary(pod(3, digest="b"), CANARY_IMAGE, 10, "mesh")}, "--canary-mode 'mesh'"),
    ({"canary": Canary(pod(3, digest="b"), CANARY_IMAGE, 10), "kserve": True}, "does not go with --kserve"),
    ({"gpu": -1}, "--gpu must be >= 0"),
    ({"autoscaler": "keda", "namespace": None}, "--autoscaler keda needs --namespace"),
    ({"http_port": 8081}, "--port and --grpc-port must differ"),
])
def test_bad_values_are_refused(changes: dict[str, Any], message: str) -> None:
    fields = {**SPECS["default"].__dict__, **changes}
    with pytest.raises(UsageError, match=re.escape(message)):
        DeploySpec(**fields).check()


def test_apply_needs_digests() -> None:
    spec = DeploySpec("churn", "127.0.0.1:5000/pods/churn:2", pod())
    spec.check()  # rendering alone is allowed (with a warning from the CLI)
    with pytest.raises(UsageError, match="--apply needs an image pinned by digest"):
        spec.check(apply=True)
    canary = DeploySpec("churn", DIGEST_IMAGE, pod(), canary=Canary(pod(3, digest="b"), "repo/churn:3", 10))
    with pytest.raises(UsageError, match="--canary image repo/churn:3"):
        canary.check(apply=True)


def test_the_kubernetes_client_stays_out_of_core_and_the_image() -> None:
    import tomllib
    from packaging.requirements import Requirement

    from modelpod.image.plan import core_pins
    from modelpod.image.wheels import Target

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if Requirement(d).name == "kubernetes"]
    assert [Requirement(d).name for d in project["optional-dependencies"]["kubernetes"]] == ["kubernetes"]
    # The image's runtime layer is what serving imports and what that needs, as installed here
    # (the kubernetes client included): neither the client nor what only it needs is in it.
    pytest.importorskip("kubernetes")
    names = {p.name for p in core_pins(Target("3.11", "x86_64", (2, 36)))}
    assert "numpy" in names and not names & {"kubernetes", "websocket-client", "requests-oauthlib", "durationpy"}
