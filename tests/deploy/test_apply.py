"""``--apply``, ``deploy status`` and ``deploy rollback`` through the official client, against a stub of the API."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from apistub import ApiStub, kubeconfig, serve, status

from modelpod.cli import main
from modelpod.deploy import apply
from modelpod.deploy.kubernetes import render
from modelpod.deploy.spec import DeploySpec, PodFacts
from modelpod.store import PodRecord

pytest.importorskip("kubernetes")
IMAGE_1 = "127.0.0.1:5000/pods/lr@sha256:" + "1" * 64
IMAGE_2 = "127.0.0.1:5000/pods/lr@sha256:" + "2" * 64
NS = "ml"
DEP = f"/apis/apps/v1/namespaces/{NS}/deployments/lr"


@pytest.fixture
def stub() -> Iterator[tuple[ApiStub, str]]:
    api = ApiStub()
    gen = serve(api)
    url = next(gen)
    yield api, url
    gen.close()


@pytest.fixture
def config(stub: tuple[ApiStub, str], tmp_path: Path) -> Path:
    return kubeconfig(tmp_path / "kubeconfig", stub[1])


def cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, Any, str]:
    capsys.readouterr()
    rc = main(["--home", str(home), *args, "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def deploy(capsys: pytest.CaptureFixture[str], home: Path, config: Path, image: str, *extra: str
           ) -> tuple[int, Any, str]:
    return cli(capsys, home, "deploy", "kubernetes", "lr", "--image", image, "--apply", "--kubeconfig",
               str(config), *extra)


def expected(rec: PodRecord, image: str) -> list[dict[str, Any]]:
    """What the CLI renders for the served pod: no namespace (the context's) and the drain default."""
    m = rec.manifest
    facts = PodFacts(m.name, rec.version, rec.digest, sum(f.size for f in m.files), m.framework,
                     tuple(m.requirements), dict(m.resources), m.serving.timeout_s)
    return render(DeploySpec("lr", image, facts).check(apply=True))


def test_apply_sends_each_object_by_server_side_apply(stub: tuple[ApiStub, str], config: Path,
                                                      served_home: tuple[Path, PodRecord],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = stub
    home, rec = served_home
    rc, data, err = deploy(capsys, home, config, IMAGE_1, "--wait")
    assert rc == 0, err
    objects = expected(rec, IMAGE_1)
    patches = api.patches()
    assert len(patches) == len(objects)
    for seen, obj in zip(patches, objects, strict=True):
        plural = apply.KINDS[obj["kind"]][0]
        group = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        assert seen.path == f"{group}/namespaces/{NS}/{plural}/{obj['metadata']['name']}"
        assert seen.content_type == "application/apply-patch+yaml"
        assert seen.query == {"fieldManager": ["modelpod"]}  # no force unless asked
        body = json.loads(json.dumps(seen.body))
        body["metadata"].get("annotations", {}).pop(apply.HISTORY, None)
        assert body == obj
    # Before anything: /version proves the cluster answers; GETs only read.
    assert api.seen[0].path == "/version"
    assert {s.method for s in api.seen} == {"GET", "PATCH"}
    report = data["apply"]
    assert report["context"] == "stub" and report["namespace"] == NS
    assert report["created"] == report["applied"] == [f"{o['kind']} {o['metadata']['name']}" for o in objects]
    assert report["rollout"] == {"lr": "1 of 1 replicas available"}

    # Again: the same objects, now updates (200), nothing created, the history holds one image.
    rc, data, err = deploy(capsys, home, config, IMAGE_1)
    assert rc == 0, err
    assert data["apply"]["created"] == [] and len(data["apply"]["applied"]) == len(objects)
    assert [apply.container_image(h) for h in apply.read_history(api.objects[DEP])] == [IMAGE_1]


def test_server_dry_run_stores_nothing(stub: tuple[ApiStub, str], config: Path,
                                       served_home: tuple[Path, PodRecord],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = stub
    home, _ = served_home
    rc, data, err = deploy(capsys, home, config, IMAGE_1, "--dry-run", "--wait")
    assert rc == 0, err
    assert data["apply"]["dry_run"] is True and len(data["apply"]["applied"]) == len(api.patches())
    assert all(p.query["dryRun"] == ["All"] for p in api.patches())
    assert api.objects == {}


def test_conflicts_and_force(stub: tuple[ApiStub, str], config: Path, served_home: tuple[Path, PodRecord],
                             capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = stub
    home, _ = served_home
    assert deploy(capsys, home, config, IMAGE_1)[0] == 0
    field = ".spec.template.spec.containers[name=server].image"
    api.own(DEP, field, "kubectl-edit")
    before = len(api.patches())
    rc, _, err = deploy(capsys, home, config, IMAGE_2)
    assert rc == 1
    assert "Deployment lr in namespace ml was refused: 409 Conflict" in err
    assert 'conflict with "kubectl-edit"' in err and field in err and "--force-conflicts" in err
    assert "Applied before it: ServiceAccount lr, Service lr" in err
    assert "not applied: PodDisruptionBudget lr" in err or "not applied: NetworkPolicy lr" in err
    assert apply.container_image(api.objects[DEP]) == IMAGE_1  # nothing changed the Deployment
    rc, data, err = deploy(capsys, home, config, IMAGE_2, "--force-conflicts")
    assert rc == 0, err
    assert all(p.query["force"] == ["true"] for p in api.patches()[before + 3:])
    assert apply.container_image(api.objects[DEP]) == IMAGE_2


def test_a_refused_object_is_named_with_the_apis_reason(stub: tuple[ApiStub, str], config: Path,
                                                        served_home: tuple[Path, PodRecord],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = stub
    home, _ = served_home
    hpa = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/lr"
    api.reject[hpa] = (422, status(422, "Invalid", 'HorizontalPodAutoscaler.autoscaling "lr" is invalid: '
                                   "spec.metrics[0].pods.metric.name: Required value",
                                   name="lr", kind="HorizontalPodAutoscaler",
                                   causes=[{"reason": "FieldValueRequired", "message": "Required value",
                                            "field": "spec.metrics[0].pods.metric.name"}]))
    rc, _, err = deploy(capsys, home, config, IMAGE_1)
    assert rc == 1
    assert "HorizontalPodAutoscaler lr in namespace ml was refused: 422 Invalid" in err
    assert "spec.metrics[0].pods.metric.name: Required value" in err
    # Half applied, and said so: what went in before the refusal is listed.
    assert ("Applied before it: ServiceAccount lr, Service lr, Deployment lr, PodDisruptionBudget lr, "
            "NetworkPolicy lr") in err
    assert DEP in api.objects


def test_a_stuck_rollout_is_reported(stub: tuple[ApiStub, str], config: Path, served_home: tuple[Path, PodRecord],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = stub
    home, _ = served_home
    api.rollout = "slow"
    rc, data, err = deploy(capsys, home, config, IMAGE_1, "--wait")
    assert rc == 0, err
    assert api.polls["/apis/apps/v1/namespaces/ml/deployments/lr"] > api.slow_polls  # it waited for progress
    api.rollout = "stuck"
    rc, _, err = deploy(capsys, home, config, IMAGE_2, "--wait")
    assert rc == 1
    assert "Deployment ml/lr: rollout stuck" in err and "has timed out progressing" in err
    assert "modelpod deploy rollback lr" in err


def test_status_and_rollback_to_the_previous_image(stub: tuple[ApiStub, str], config: Path,
                                                   served_home: tuple[Path, PodRecord],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = stub
    home, rec = served_home
    assert deploy(capsys, home, config, IMAGE_1)[0] == 0
    first = api.patches()[2].body  # the Deployment as applied with image 1
    assert deploy(capsys, home, config, IMAGE_2, "--replicas", "3")[0] == 0
    target = ("--kubeconfig", str(config))
    rc, data, err = cli(capsys, home, "deploy", "status", "lr", *target)
    assert rc == 0, err
    (dep,) = data["deployments"]
    assert dep["image"] == IMAGE_2 and dep["history"] == [IMAGE_1, IMAGE_2] and dep["rollout"] == "done"
    assert dep["pod_digest"] == rec.digest
    assert dep["autoscaler"]["min"] == 3 and dep["autoscaler"]["max"] == 10  # the second apply's --replicas 3

    capsys.readouterr()
    assert main(["--home", str(home), "deploy", "status", "lr", *target]) == 0
    human = capsys.readouterr().out
    assert "Deployment lr: done" in human and f"image  {IMAGE_2}" in human
    assert f"history (oldest first): {IMAGE_1}, {IMAGE_2}" in human and "(min 3, max 10)" in human

    before = len(api.patches())
    rc, data, err = cli(capsys, home, "deploy", "rollback", "lr", *target, "--wait")
    assert rc == 0, err
    assert data["from"] == IMAGE_2 and data["to"] == IMAGE_1
    (sent,) = api.patches()[before:]
    assert sent.path == DEP and sent.query == {"fieldManager": ["modelpod"]}
    # Exactly what was applied with image 1 (its other settings too), as the same field manager.
    strip = lambda d: {**d, "metadata": {k: v for k, v in d["metadata"].items() if k != "annotations"}}  # noqa: E731
    assert strip(sent.body) == strip(first)
    assert apply.container_image(api.objects[DEP]) == IMAGE_1
    rc, data, err = cli(capsys, home, "deploy", "rollback", "lr", *target)
    assert rc == 2 and "no earlier image in its history" in err
    rc, _, err = cli(capsys, home, "deploy", "status", "nope", *target)
    assert rc == 2 and "no Deployment nope in namespace ml (context stub)" in err


def test_apply_refuses_an_image_without_digest_before_any_request(stub: tuple[ApiStub, str], config: Path,
                                                                  served_home: tuple[Path, PodRecord],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = stub
    home, _ = served_home
    rc, _, err = deploy(capsys, home, config, "127.0.0.1:5000/pods/lr:1")
    assert rc == 2 and "--apply needs an image pinned by digest" in err
    assert api.seen == []


def test_an_unreachable_cluster_fails_fast_naming_the_context(tmp_path: Path, served_home: tuple[Path, PodRecord],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = served_home
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = kubeconfig(tmp_path / "closed", f"http://127.0.0.1:{closed}", context="prod-eu")
    rc, _, err = deploy(capsys, home, config, IMAGE_1)
    assert rc == 1 and "cannot reach the cluster of context 'prod-eu'" in err and str(closed) in err

    # A server that accepts and never answers: the call's timeout bounds the wait.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        config = kubeconfig(tmp_path / "silent", f"http://127.0.0.1:{silent.getsockname()[1]}", context="stalled")
        rc, _, err = deploy(capsys, home, config, IMAGE_1, "--timeout", "1")
        assert rc == 1 and "context 'stalled'" in err and "within 1 s" in err
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        silent.close()

    rc, _, err = deploy(capsys, home, config, IMAGE_1, "--context", "nope")
    assert rc == 1 and "no context 'nope' in the kubeconfig (it has: stalled)" in err


def test_render_only_writes_a_directory_and_prints_the_choice(tmp_path: Path, served_home: tuple[Path, PodRecord],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    home, rec = served_home
    rc, data, err = cli(capsys, home, "deploy", "kubernetes", "lr", "--image", IMAGE_1, "-o", str(tmp_path / "k"),
                        "--namespace", NS)
    assert rc == 0, err
    assert (tmp_path / "k" / "kustomization.yaml").is_file()
    assert (tmp_path / "k" / "prometheus-adapter-rule.yaml").is_file()
    config_map = yaml.safe_load((tmp_path / "k" / "prometheus-adapter-rule.yaml").read_text())
    rule = yaml.safe_load(config_map["data"]["config.yaml"])["rules"][0]
    assert rule["name"]["as"] == "modelpod_inflight_requests"
    assert rule["seriesQuery"].startswith("modelpod_inflight_requests{")
    kustomization = yaml.safe_load((tmp_path / "k" / "kustomization.yaml").read_text())
    assert "prometheus-adapter-rule.yaml" not in kustomization["resources"]  # it belongs to the adapter
    # Without --json: YAML on stdout, the notes on stderr.
    capsys.readouterr()
    assert main(["--home", str(home), "deploy", "kubernetes", "lr", "--image", "repo/lr:1", "--replicas", "1"]) == 0
    out, err = capsys.readouterr()
    assert [d["kind"] for d in yaml.safe_load_all(out)][:3] == ["ServiceAccount", "Service", "Deployment"]
    assert "not pinned by digest" in err and "no PodDisruptionBudget" in err
    rc, _, err = cli(capsys, home, "deploy", "kubernetes", "lr", "--image", IMAGE_1, "--replicas", "0")
    assert rc == 2 and "--replicas 0" in err
    rc, data, err = cli(capsys, home, "deploy", "kubernetes", "lr", "--image", IMAGE_1, "--scale-to-zero",
                        "-n", NS)
    assert rc == 0, err
    assert "ScaledObject/lr" in data["objects"] and "HorizontalPodAutoscaler/lr" not in data["objects"]
    scaled = next(d for d in yaml.safe_load_all(data["yaml"]) if d["kind"] == "ScaledObject")
    assert scaled["spec"]["minReplicaCount"] == 0
    rc, _, err = cli(capsys, home, "deploy", "kubernetes", "lr", "--image", IMAGE_1, "--scale-to-zero",
                     "--autoscaler", "hpa")
    assert rc == 2 and "--scale-to-zero needs --autoscaler keda" in err
    rc, data, err = cli(capsys, home, "deploy", "kubernetes", "lr", "--image", IMAGE_1, "--drain-timeout", "90",
                        "-o", "-")
    dep = next(d for d in yaml.safe_load_all(data["yaml"]) if d["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODELPOD_DRAIN_TIMEOUT_S"] == "90"
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 95
    rc, _, err = cli(capsys, home, "deploy", "kubernetes", "lr", "--image", IMAGE_1, "--canary", "lr:1:10",
                     "--canary-image", IMAGE_2)
    assert rc == 2 and "--canary names the same pod" in err


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, Any, object]) -> Path:
    """A store with lr:1 and lr:2 (same model file, other labels: another digest)."""
    from modelpod.packing import pack
    from modelpod.store import Store

    path, sample, _ = sklearn_model
    home = tmp_path_factory.mktemp("twoversions")
    pack(path, "lr", Store(home), sample=sample)
    pack(path, "lr", Store(home), sample=sample, labels={"stage": "candidate"})
    return home


def test_canary_and_job_from_the_command_line(two_versions: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    home = two_versions
    rc, data, err = cli(capsys, home, "deploy", "kubernetes", "lr:1", "--image", IMAGE_1, "--canary", "lr:2:10",
                        "--canary-image", IMAGE_2, "-o", str(tmp_path / "server"))
    assert rc == 0, err
    assert data["canary_mode"] == "server" and "ConfigMap/lr-routes" in data["objects"]
    assert any("one Deployment, split in the server" in n and "KiB together" in n for n in data["notes"])
    rc, data, err = cli(capsys, home, "deploy", "kubernetes", "lr:1", "--image", IMAGE_1, "--canary", "lr:2:10",
                        "--canary-image", IMAGE_2, "--canary-mode", "gateway", "-o", str(tmp_path / "gw"))
    assert rc == 0, err
    assert {"Deployment/lr-canary", "HTTPRoute/lr", "Service/lr-canary"} <= set(data["objects"])
    route = yaml.safe_load((tmp_path / "gw" / "httproute-lr.yaml").read_text())
    assert [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]] == [90, 10]
    rc, _, err = cli(capsys, home, "deploy", "kubernetes", "lr:1", "--image", IMAGE_1, "--canary", "lr:2:10")
    assert rc == 2 and "--canary needs --canary-image" in err
    for bad in ("lr", "lr:2:ten"):
        rc, _, err = cli(capsys, home, "deploy", "kubernetes", "lr:1", "--image", IMAGE_1, "--canary", bad,
                         "--canary-image", IMAGE_2)
        assert rc == 2 and "use REF:WEIGHT" in err

    rc, data, err = cli(capsys, home, "deploy", "kubernetes", "lr:2", "--image", IMAGE_2, "--job", "--input",
                        "/data/in.parquet", "--output", "/data/out.parquet", "--shards", "6", "--job-volume",
                        "batch-data", "-o", "-")
    assert rc == 0, err
    job = next(d for d in yaml.safe_load_all(data["yaml"]) if d["kind"] == "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["batch", "/opt/modelpod/pod", "--input", "/data/in.parquet", "--output",
                         "/data/out.parquet", "--shards", "6", "--resume"]
    assert job["spec"]["completions"] == 6 and job["spec"]["completionMode"] == "Indexed"
    rc, _, err = cli(capsys, home, "deploy", "kubernetes", "lr:2", "--image", IMAGE_2, "--job")
    assert rc == 2 and "--job needs --input and --output" in err


def test_bad_kubeconfig_and_output_are_refused_with_a_message(tmp_path: Path, served_home: tuple[Path, PodRecord],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = served_home
    rc, _, err = cli(capsys, home, "deploy", "status", "lr", "--kubeconfig", str(tmp_path / "missing"))
    assert rc == 1 and f"no kubeconfig file {tmp_path / 'missing'}" in err
    (tmp_path / "broken").write_text("clusters: [\n")
    rc, _, err = cli(capsys, home, "deploy", "status", "lr", "--kubeconfig", str(tmp_path / "broken"))
    assert rc == 1 and f"cannot use the kubeconfig {tmp_path / 'broken'}" in err and "Traceback" not in err
    (tmp_path / "afile").write_text("")
    rc, _, err = cli(capsys, home, "deploy", "kubernetes", "lr", "--image", IMAGE_1, "-o", str(tmp_path / "afile"))
    assert rc == 2 and "not a directory" in err


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl, as a cluster's CA would issue one)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (.ci/setup-system.sh installs it)")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stub",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_apply_over_tls_trusts_the_kubeconfigs_authority(tmp_path: Path, served_home: tuple[Path, PodRecord],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = served_home
    cert, key = _certificate(tmp_path, "api")
    other, _ = _certificate(tmp_path, "other")
    api = ApiStub()
    gen = serve(api, tls=(cert, key))
    url = next(gen)
    try:
        good = kubeconfig(tmp_path / "good", url, ca=cert)
        rc, data, err = deploy(capsys, home, good, IMAGE_1)
        assert rc == 0, err
        assert len(api.patches()) == len(data["apply"]["applied"]) > 0
        bad = kubeconfig(tmp_path / "bad", url, ca=other, context="wrong-ca")
        rc, _, err = deploy(capsys, home, bad, IMAGE_1)
        assert rc == 1 and "context 'wrong-ca'" in err and "CERTIFICATE_VERIFY_FAILED" in err
    finally:
        gen.close()
