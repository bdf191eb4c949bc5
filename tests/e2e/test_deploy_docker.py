"""The rendered pod template run as Kubernetes would run it, in the Docker engine.

``modelpod deploy kubernetes --push`` builds the image, pushes it to the local registry and pins it
by digest; the container then starts from what the Deployment says: its command, args, env and
ports, its user (and, as OpenShift does, an arbitrary UID with group 0), a read-only root, ``/tmp``
as a tmpfs, all capabilities dropped, no privilege escalation. Every probe must answer, a
prediction must be right, and SIGTERM under load (after the endpoint stopped sending new requests,
which is what the preStop pause covers) must lose no request and end the process within the grace
period.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
Kit = Any
TOKEN = "k8s-test-token"
SLOW_MODEL = '''
import time

import numpy as np

from modelpod import Model


class Slow(Model):
    """Doubles its input, slowly, so requests are still in flight when SIGTERM comes."""

    def predict(self, inputs):
        (x,) = inputs.values()
        time.sleep(0.2)
        return {"doubled": np.asarray(x) * 2}
'''


def logs(cid: str) -> str:
    proc = subprocess.run(["docker", "logs", cid], capture_output=True, text=True, timeout=60, check=False)
    return (proc.stdout + proc.stderr)[-3000:]


def docker(*args: str, timeout: float = 300, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, base_image: Any, oci_registry: Any, kit: Kit,
             docker_engine: bool) -> Iterator[dict[str, Any]]:
    """The slow pod built and pushed by ``deploy kubernetes --push``; its manifests and pinned image."""
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")
    from modelpod.packing import pack
    from modelpod.store import Store

    home = tmp_path_factory.mktemp("k8shome")
    kit.shared_wheels(home)
    code = tmp_path_factory.mktemp("slowcode")
    (code / "slow.py").write_text(textwrap.dedent(SLOW_MODEL))
    pack(code, "slow", Store(home), sample=np.ones((1, 3), np.float32))
    port = kit.free_port()
    out = tmp_path_factory.mktemp("manifests")
    repo = oci_registry.repo("slow")
    # REST only: the image holds no grpcio (gRPC needs the grpc extra in the pod's requirements).
    common = ["--port", str(port), "--no-grpc", "--autoscaler", "none", "--replicas", "1",
              "--token-secret", "slow-token", "--json"]
    data = _cli(home, "deploy", "kubernetes", "slow:1", "--push", repo, "--base", base_image.oci,
                "-o", str(out / "plain"), *common)
    image = data["image"]
    assert image.startswith(f"{repo}@sha256:")
    openshift = _cli(home, "deploy", "kubernetes", "slow:1", "--image", image, "--openshift",
                     "-o", str(out / "openshift"), *common)
    assert openshift["image"] == image
    docker("pull", image, timeout=600)
    try:
        yield {"dir": out, "image": image, "port": port, "repo": repo, "home": home, "code": code}
    finally:
        docker("rmi", image, check=False)


def _cli(home: Path, *args: str) -> Any:
    proc = subprocess.run([sys.executable, "-m", "modelpod", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def template(directory: Path) -> dict[str, Any]:
    dep = yaml.safe_load((directory / "deployment-slow.yaml").read_text())
    return dict(dep["spec"]["template"]["spec"])


def docker_run_args(pod: dict[str, Any], user: str, sources: dict[str, str] | None = None) -> list[str]:
    """``docker run`` flags for the pod template's one container, as a kubelet would set them up.

    ``sources``: a host path or docker volume per pod volume name; an emptyDir without one is a tmpfs.
    """
    (c,) = pod["containers"]
    sc = c["securityContext"]
    args = ["--network", "host", "--user", user, "--entrypoint", c["command"][0]]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    args += [f"--cap-drop={cap}" for cap in sc["capabilities"]["drop"]]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in c["volumeMounts"]:
        if mount["name"] in (sources or {}):
            ro = ":ro" if mount.get("readOnly") else ""
            args += ["-v", f"{(sources or {})[mount['name']]}:{mount['mountPath']}{ro}"]
            continue
        assert "emptyDir" in volumes[mount["name"]], mount
        args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]  # an emptyDir, writable by any UID
    args += [f"-e{e['name']}={e['value']}" for e in c["env"]]
    return args


def secret_dir(tmp: Path, pod: dict[str, Any]) -> str:
    """The token Secret's volume, as the kubelet writes it: one file per item."""
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "slow-token"
    folder = tmp / f"secret-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o755)
    for item in volume["secret"]["items"]:
        (folder / item["path"]).write_text(TOKEN)
        (folder / item["path"]).chmod(0o444)
    return str(folder)


def start(pod: dict[str, Any], image: str, user: str, tmp: Path) -> str:
    (c,) = pod["containers"]
    sources = {"token": secret_dir(tmp, pod)}
    return docker("run", "-d", "--name", f"modelpod-k8s-{uuid.uuid4().hex[:12]}",
                  *docker_run_args(pod, user, sources), image, *c["command"][1:], *c["args"])


def status_of(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def running(cid: str) -> bool:
    state = json.loads(docker("inspect", cid))[0]["State"]
    return bool(state["Running"])


def infer_body() -> bytes:
    return json.dumps({"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP32",
                                   "data": [1.0, 2.0, 3.5]}]}).encode()


def check_probes_and_predict(pod: dict[str, Any], cid: str, port: int, kit: Kit) -> None:
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == port
    base = f"http://127.0.0.1:{port}"

    def answers(path: str) -> bool:
        if not running(cid):
            raise AssertionError(f"the container exited: {logs(cid)}")
        return status_of(base + path) == 200

    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert ports[get["port"]] == port
        kit.wait_for(lambda path=get["path"]: answers(path), 120, f"{probe} {get['path']} to answer 200")
    req = urllib.request.Request(f"{base}/v2/models/slow/infer", data=infer_body(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["outputs"][0]["data"] == [2.0, 4.0, 7.0]
    assert status_of(f"{base}/metrics") == 401 and status_of(f"{base}/metrics", TOKEN) == 200


class Load:
    """Clients behind a Service: each keeps a connection and sends requests until its endpoint goes."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.gate = threading.Lock()  # held while a request is sent; closing the endpoint takes it
        self.open = True
        self.answers: list[tuple[int, float]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        for _ in range(10_000):  # bounded: the endpoint closes long before
            with self.gate:
                if not self.open:
                    break
                try:
                    conn.request("POST", "/v2/models/slow/infer", infer_body(), headers)
                except OSError as exc:
                    self.errors.append(f"send: {exc!r}")
                    break
            try:
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(f"answer: {exc!r}")
                break
            self.answers.append((resp.status, time.monotonic()))
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.close()

    def close_endpoint(self) -> None:
        with self.gate:
            self.open = False


def inflight(port: int) -> float:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("modelpod_inflight_requests{"))


def test_pushed_image_is_pinned_in_the_registry(rendered: dict[str, Any]) -> None:
    repo, digest = rendered["image"].split("@")
    host, _, name = repo.partition("/")
    req = urllib.request.Request(f"http://{host}/v2/{name}/manifests/{digest}", method="HEAD", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Docker-Content-Digest"] == digest
    kustomization = yaml.safe_load((rendered["dir"] / "plain" / "kustomization.yaml").read_text())
    assert "deployment-slow.yaml" in kustomization["resources"]


def test_template_runs_as_its_user_and_drains_under_sigterm(rendered: dict[str, Any], kit: Kit,
                                                            tmp_path: Path) -> None:
    pod = template(rendered["dir"] / "plain")
    sc = pod["securityContext"]
    user = f"{sc['runAsUser']}:{sc['runAsGroup']}"
    grace = pod["terminationGracePeriodSeconds"]
    port = rendered["port"]
    cid = start(pod, rendered["image"], user, tmp_path)
    try:
        check_probes_and_predict(pod, cid, port, kit)
        load = Load(port, clients=8)
        for t in load.threads:
            t.start()
        kit.wait_for(lambda: len(load.answers) >= 16 or load.errors, 120, "16 answers under load")
        assert load.errors == []
        load.close_endpoint()  # the endpoint is gone: nothing new is sent; what was sent is in flight
        pending = inflight(port)
        assert pending >= 1, "no request in flight at SIGTERM: the test would prove nothing"
        terminated = time.monotonic()
        docker("kill", "--signal", "TERM", cid)
        kit.wait_for(lambda: status_of(f"http://127.0.0.1:{port}/v2/health/ready") != 200, 30,
                     "readiness to fail once draining")
        for t in load.threads:
            t.join(120)
        assert load.errors == [], load.errors
        assert {s for s, _ in load.answers} == {200}
        assert sum(1 for _, at in load.answers if at > terminated) >= 1  # answered during the drain
        kit.wait_for(lambda: not running(cid), grace, f"the server to exit within {grace} s")
        state = json.loads(docker("inspect", cid))[0]["State"]
        assert state["ExitCode"] == 0, logs(cid)
    finally:
        docker("rm", "-f", cid, check=False)


def test_template_runs_under_an_arbitrary_uid_with_group_0(rendered: dict[str, Any], kit: Kit,
                                                          tmp_path: Path) -> None:
    pod = template(rendered["dir"] / "openshift")
    assert "runAsUser" not in pod["securityContext"]
    cid = start(pod, rendered["image"], "1000670000:0", tmp_path)
    try:
        check_probes_and_predict(pod, cid, rendered["port"], kit)
        docker("kill", "--signal", "TERM", cid)
        kit.wait_for(lambda: not running(cid), pod["terminationGracePeriodSeconds"], "the server to exit")
        assert json.loads(docker("inspect", cid))[0]["State"]["ExitCode"] == 0
    finally:
        docker("rm", "-f", cid, check=False)


@pytest.fixture(scope="module")
def canary_rendered(rendered: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, base_image: Any,
                    kit: Kit) -> Iterator[dict[str, Any]]:
    """slow:1 with a canary slow:2 at 30 %, both built and pushed; small, so split in the server."""
    home = rendered["home"]
    from modelpod.packing import pack
    from modelpod.store import Store

    pack(rendered["code"], "slow", Store(home), sample=np.ones((1, 3), np.float32), labels={"stage": "canary"})
    out = tmp_path_factory.mktemp("canary") / "k8s"
    data = _cli(home, "deploy", "kubernetes", "slow:1", "--push", rendered["repo"], "--base", base_image.oci,
                "--canary", "slow:2:30", "-o", str(out), "--port", str(rendered["port"]), "--no-grpc",
                "--autoscaler", "none", "--replicas", "1", "--token-secret", "slow-token", "--json")
    assert data["canary_mode"] == "server"
    dep = yaml.safe_load((out / "deployment-slow.yaml").read_text())
    images = {c["image"] for c in dep["spec"]["template"]["spec"]["initContainers"]}
    for image in images - {rendered["image"]}:
        docker("pull", image, timeout=600)
    try:
        yield {"dir": out, "deployment": dep, "images": images}
    finally:
        for image in images - {rendered["image"]}:
            docker("rmi", image, check=False)


def test_in_server_canary_template_splits_traffic(canary_rendered: dict[str, Any], rendered: dict[str, Any],
                                                  kit: Kit, tmp_path: Path) -> None:
    """The init containers seed the replica's store, the server serves both aliases, its route splits."""
    pod = dict(canary_rendered["deployment"]["spec"]["template"]["spec"])
    sc = pod["securityContext"]
    user = f"{sc['runAsUser']}:{sc['runAsGroup']}"
    config_map = yaml.safe_load((canary_rendered["dir"] / "configmap-slow-routes.yaml").read_text())
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for key, text in config_map["data"].items():
        (config_dir / key).write_text(text)
    config_dir.chmod(0o755)
    volume = f"modelpod-k8s-{uuid.uuid4().hex[:12]}"  # the emptyDir all of the pod's containers share
    docker("volume", "create", volume)
    cid = ""
    try:
        for init in pod["initContainers"]:
            mounts = [m["mountPath"] for m in init["volumeMounts"]]
            assert mounts == ["/tmp"]
            env = [f"-e{e['name']}={e['value']}" for e in init.get("env", [])]
            docker("run", "--rm", "--network", "host", "--user", user, "--read-only", "--cap-drop=ALL",
                   "--security-opt", "no-new-privileges", "-v", f"{volume}:/tmp", *env,
                   "--entrypoint", init["command"][0], init["image"], *init["command"][1:], *init["args"])
        (c,) = pod["containers"]
        args = docker_run_args(pod, user, {"tmp": volume, "config": str(config_dir),
                                           "token": secret_dir(tmp_path, pod)})
        cid = docker("run", "-d", "--name", f"modelpod-k8s-{uuid.uuid4().hex[:12]}", *args, rendered["image"],
                     *c["command"][1:], *c["args"])
        check_probes_and_predict(pod, cid, rendered["port"], kit)
        seen: dict[str, int] = {}
        lock = threading.Lock()

        def call() -> None:
            for _ in range(6):
                req = urllib.request.Request(
                    f"http://127.0.0.1:{rendered['port']}/v2/models/slow/infer", data=infer_body(), method="POST",
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    variant = resp.headers["modelpod-variant"]
                with lock:
                    seen[variant] = seen.get(variant, 0) + 1

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert sum(seen.values()) == 48
        assert set(seen) == {"slow:1", "slow:2"}, seen  # the replica's store: stable is 1, canary 2
        assert 3 <= seen["slow:2"] <= 28  # 30 % of 48 is 14.4; these bounds are beyond 4 sigma
    finally:
        if cid:
            docker("rm", "-f", cid, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def test_indexed_job_template_scores_every_shard(rendered: dict[str, Any], base_image: Any, kit: Kit,
                                                 tmp_path: Path) -> None:
    """The Job's container, run once per completion index over a shared volume: the shards merge
    into every input row scored exactly once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "pvc"  # the PersistentVolumeClaim, writable by the job's user
    data.mkdir()
    data.chmod(0o777)
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]}), data / "in.parquet", row_group_size=5)
    out = tmp_path / "job"
    info = _cli(rendered["home"], "deploy", "kubernetes", "slow:1", "--job", "--push", rendered["repo"],
                "--base", base_image.oci, "--input", "/data/in.parquet", "--output", "/data/out.parquet",
                "--shards", "2", "--job-volume", "scores", "--batch-arg=--columns", "--batch-arg=a,b,c",
                "-o", str(out), "--json")
    job = yaml.safe_load((out / "job-slow.yaml").read_text())
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = pod["securityContext"]
    docker("pull", info["image"], timeout=600)
    try:
        for index in range(job["spec"]["completions"]):  # what the Job controller starts, one per index
            args = docker_run_args(pod, f"{sc['runAsUser']}:{sc['runAsGroup']}", {"data": str(data)})
            docker("run", "--rm", "-eJOB_COMPLETION_INDEX=" + str(index), *args, info["image"],
                   *c["command"][1:], *c["args"], timeout=600)
    finally:
        docker("rmi", info["image"], check=False)
    from modelpod.cli import main

    assert main(["batch", "merge", "--output", str(data / "out.parquet")]) == 0
    table = pq.read_table(data / "out.parquet")
    assert table.num_rows == 20
    got = np.asarray(table.column(table.column_names[-1]).to_pylist(), dtype=np.float32)
    assert np.array_equal(got, x * 2)
