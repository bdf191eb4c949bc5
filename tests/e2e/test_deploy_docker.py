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
        yield {"dir": out, "image": image, "port": port, "repo": repo}
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


def docker_run_args(pod: dict[str, Any], user: str) -> list[str]:
    """``docker run`` flags for the pod template's one container, as a kubelet would set them up."""
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
        assert "emptyDir" in volumes[mount["name"]], mount
        args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]  # an emptyDir, writable by any UID
    for e in c["env"]:
        if "value" in e:
            args += ["-e", f"{e['name']}={e['value']}"]
        else:  # the Secret's value, as the kubelet would put it there
            assert e["valueFrom"]["secretKeyRef"]["name"] == "slow-token"
            args += ["-e", f"{e['name']}={TOKEN}"]
    return args


def start(pod: dict[str, Any], image: str, user: str) -> str:
    (c,) = pod["containers"]
    return docker("run", "-d", "--name", f"modelpod-k8s-{uuid.uuid4().hex[:12]}", *docker_run_args(pod, user),
                  image, *c["command"][1:], *c["args"])


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
            raise AssertionError(f"the container exited: {docker('logs', cid, check=False)[-3000:]}")
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


def test_template_runs_as_its_user_and_drains_under_sigterm(rendered: dict[str, Any], kit: Kit) -> None:
    pod = template(rendered["dir"] / "plain")
    sc = pod["securityContext"]
    user = f"{sc['runAsUser']}:{sc['runAsGroup']}"
    grace = pod["terminationGracePeriodSeconds"]
    port = rendered["port"]
    cid = start(pod, rendered["image"], user)
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
        assert state["ExitCode"] == 0, docker("logs", cid, check=False)[-3000:]
    finally:
        docker("rm", "-f", cid, check=False)


def test_template_runs_under_an_arbitrary_uid_with_group_0(rendered: dict[str, Any], kit: Kit) -> None:
    pod = template(rendered["dir"] / "openshift")
    assert "runAsUser" not in pod["securityContext"]
    cid = start(pod, rendered["image"], "1000670000:0")
    try:
        check_probes_and_predict(pod, cid, rendered["port"], kit)
        docker("kill", "--signal", "TERM", cid)
        kit.wait_for(lambda: not running(cid), pod["terminationGracePeriodSeconds"], "the server to exit")
        assert json.loads(docker("inspect", cid))[0]["State"]["ExitCode"] == 0
    finally:
        docker("rm", "-f", cid, check=False)
