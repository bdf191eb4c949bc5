"""End-to-end fixtures: a Debian base image made once per machine, a local registry, Docker gating.

No registry on the internet is reachable here, so the base is made with debootstrap (about a minute,
once) and cached under ``~/.cache/modelpod-tests/base`` as an OCI layout and a docker archive,
written by modelpod's own deterministic tar code. Docker tests skip without an engine, and fail
instead when ``MODELPOD_REQUIRE_DOCKER=1`` (CI).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.image.oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BlobStore,
    Descriptor,
    Image,
    to_json,
    write_docker_archive,
    write_layout,
)
from modelpod.image.tarball import tree_entries, write_layer
from modelpod.store import PodRecord, Store

CACHE = Path(os.environ.get("MODELPOD_TEST_CACHE") or Path.home() / ".cache" / "modelpod-tests")
BASE_TAG = "bookworm"
BASE_FORMAT = "2"  # bump to rebuild every machine's cached base
REQUIRE_DOCKER = os.environ.get("MODELPOD_REQUIRE_DOCKER") == "1"
# Kept out of the base to keep it small: nothing here is needed to run Python.
_DROP = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
         "usr/share/locale", "usr/share/lintian", "usr/share/common-licenses", "var/log", "dev")


def unavailable(reason: str) -> None:
    """Skip, or fail where CI requires every end-to-end test to run."""
    if REQUIRE_DOCKER:
        pytest.fail(f"required for MODELPOD_REQUIRE_DOCKER=1: {reason}")
    pytest.skip(reason)


# -- docker gating --------------------------------------------------------------------------------
def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                              capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> bool:
    return _docker_answers()


@pytest.fixture(autouse=True)
def _gate_docker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("docker") is not None and not request.getfixturevalue("docker_engine"):
        unavailable("no Docker engine answers (docker version)")


# -- helpers ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: object, deadline_s: float, what: str) -> None:
    """Poll ``check()`` until it is true or the deadline passes (no fixed sleeps)."""
    end = time.monotonic() + deadline_s
    delay = 0.02
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    raise TimeoutError(f"gave up waiting for {what} after {deadline_s:.0f}s")


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def apt_mirror() -> str:
    """The Debian archive URI in this machine's apt sources (deb822 or one-line format)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for block in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
            if uris and suites and "bookworm" in suites.group(1).split() and "debian-security" not in uris.group(1):
                return uris.group(1)
    for path in (Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")):
        if path.is_file():
            for line in path.read_text().splitlines():
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if m and "security" not in m.group(1):
                    return m.group(1)
    return "http://deb.debian.org/debian"


# -- the base image -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseImages:
    layout: Path  # OCI layout directory holding the base tagged BASE_TAG
    archive: Path  # the same image as a docker archive
    digest: str

    @property
    def oci(self) -> str:
        return f"oci:{self.layout}:{BASE_TAG}"


def _make_base(root: Path) -> None:
    if os.geteuid() != 0:
        unavailable("making the base image needs root (debootstrap)")
    if shutil.which("debootstrap") is None:
        unavailable("debootstrap is not installed (.ci/setup-system.sh installs it)")
    work = root.parent / f"base-work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    rootfs = work / "rootfs"
    try:
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", BASE_TAG, str(rootfs), apt_mirror()],
            capture_output=True, text=True, timeout=900, check=False,
        )
        if proc.returncode != 0:
            unavailable(f"debootstrap failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        for rel in _DROP:
            target = rootfs / rel
            if target.is_dir():
                for child in target.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        store = BlobStore(work / "blobs")
        with store.writer() as w:
            got = write_layer(tree_entries(rootfs, keep_metadata=True), w)
            w.finish(got.digest)
        config = to_json({
            "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
                       "Cmd": ["/usr/bin/python3"]},
            "rootfs": {"type": "layers", "diff_ids": [got.diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z",
                         "created_by": f"debootstrap --variant=minbase --include=python3 {BASE_TAG}"}],
        })
        config_desc = Descriptor(OCI_CONFIG, store.put_bytes(config), len(config))
        layer = Descriptor(OCI_LAYER_GZIP, got.digest, got.size)
        manifest = to_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_dict(),
                            "layers": [layer.to_dict()]})
        image = Image(manifest, OCI_MANIFEST, config_desc, (layer,))
        fresh = work / "out"
        write_layout(fresh / "layout", image, store, BASE_TAG)
        write_docker_archive(fresh / "base.tar", image, store, [f"modelpod-test-base:{BASE_TAG}"])
        (fresh / "done.json").write_text(json.dumps({"format": BASE_FORMAT, "digest": image.digest}))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(fresh, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def base_image() -> BaseImages:
    """Debian bookworm minbase + python3 (CPython 3.11 in /usr/bin), made once per machine."""
    root = CACHE / "base"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions wait for one debootstrap
        done = root / "done.json"
        if not done.is_file() or json.loads(done.read_text()).get("format") != BASE_FORMAT:
            _make_base(root)
        digest = json.loads(done.read_text())["digest"]
    return BaseImages(root / "layout", root / "base.tar", digest)


# -- a registry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistryServer:
    host: str  # 127.0.0.1:PORT
    prefix: str  # a per-session repository prefix, so a shared registry starts empty for us

    def repo(self, name: str) -> str:
        return f"{self.host}/{self.prefix}/{name}"


def _registry_answers(host: str) -> bool:
    return http_status(f"http://{host}/v2/") == 200


def start_registry(directory: Path, auth: dict[str, object] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A CNCF distribution registry on a free loopback port, storing under ``directory``."""
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        unavailable("no docker-registry binary (.ci/setup-system.sh installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(directory / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    if auth:
        config["auth"] = auth
    (directory / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    with (directory / "registry.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(binary), "serve", str(directory / "config.yml")], stdout=log, stderr=log)
    host = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or http_status(f"http://{host}/v2/") in (200, 401), 30,
                 "the registry to answer")
    except TimeoutError:
        stop(proc)
        raise
    if proc.poll() is not None:
        pytest.fail(f"docker-registry exited: {(directory / 'registry.log').read_text()[-2000:]}")
    return proc, host


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this session started, by its PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """The registry on 127.0.0.1:5000 when one runs there (.ci/setup-system.sh), else our own."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    shared = os.environ.get("MODELPOD_TEST_REGISTRY", "127.0.0.1:5000")
    if _registry_answers(shared):
        yield RegistryServer(shared, prefix)
        return
    proc, host = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield RegistryServer(host, prefix)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def oci_registry_base(oci_registry: RegistryServer, base_image: BaseImages) -> str:
    """The base image pushed to the registry; its reference."""
    from modelpod.image.registry import Reference, Registry

    store = BlobStore(base_image.layout / "blobs")  # a layout's blobs/ is a blob store already
    manifest = store.path(base_image.digest).read_bytes()
    doc = json.loads(manifest)
    ref = Reference.parse(oci_registry.repo(f"base/debian:{BASE_TAG}"))
    client = Registry(ref.host)
    for d in (doc["config"], *doc["layers"]):
        desc = Descriptor.from_dict(d)
        client.push_blob(ref.repository, desc, store.path(desc.digest))
    client.put_manifest(ref.repository, BASE_TAG, manifest, OCI_MANIFEST)
    return str(ref)


# -- pods -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PodHome:
    home: Path  # MODELPOD_HOME: the store, and the builder's cache under home/cache
    record: PodRecord
    sample: np.ndarray  # type: ignore[type-arg]

    @property
    def store(self) -> Store:
        return Store(self.home)


def shared_wheels(home: Path) -> None:
    """Point a home's wheel cache at one kept across sessions: rebuilds download nothing."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    (home / "cache").mkdir(parents=True, exist_ok=True)
    link = home / "cache" / "wheels"
    if not link.exists():
        link.symlink_to(wheels, target_is_directory=True)


@pytest.fixture(scope="session")
def sk_pod(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, object]) -> PodHome:  # type: ignore[type-arg]
    """A packed LogisticRegression pod in a session store whose builder cache all image tests share."""
    from modelpod.packing import pack

    path, sample, _ = sklearn_model
    home = tmp_path_factory.mktemp("imghome")
    shared_wheels(home)
    rec = pack(path, "sk-lr", Store(home), sample=sample)
    return PodHome(home, rec, sample)


def docker(*args: str, timeout: float = 600, check: bool = True) -> str:
    """Run the docker CLI; its stdout, or a failed assertion with its stderr."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def published(cid: str, port: int) -> int:
    """The loopback port Docker published a container's ``port`` on (``-p 127.0.0.1::PORT``)."""
    return int(docker("port", cid, f"{port}/tcp").splitlines()[0].rsplit(":", 1)[1])


def wait_container(cid: str, check: Any, deadline_s: float, what: str) -> None:
    """Poll ``check()`` while the container runs; a failed assertion with its logs if it exits or times out."""
    def ready() -> bool:
        state = json.loads(docker("inspect", cid))[0]["State"]
        if not state["Running"]:
            raise AssertionError(f"the container exited ({state['ExitCode']}): {docker('logs', cid)[-3000:]}")
        return bool(check())

    try:
        wait_for(ready, deadline_s, what)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for {what}: {docker('logs', cid, check=False)[-3000:]}") from None


class Kit:
    """Helpers the image tests share, handed out by the ``kit`` fixture (test modules here are not a
    package, so they cannot import from this file)."""

    docker = staticmethod(docker)
    published = staticmethod(published)
    wait_container = staticmethod(wait_container)

    unavailable = staticmethod(unavailable)
    free_port = staticmethod(free_port)
    wait_for = staticmethod(wait_for)
    http_status = staticmethod(http_status)
    shared_wheels = staticmethod(shared_wheels)
    start_registry = staticmethod(start_registry)
    stop = staticmethod(stop)

    @staticmethod
    def run(*argv: str, timeout: float = 300) -> str:
        """Run a reference tool; its stdout, or a failed assertion with its stderr."""
        if shutil.which(argv[0]) is None:
            unavailable(f"{argv[0]} is not installed (.ci/setup-system.sh installs it)")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        assert proc.returncode == 0, f"{' '.join(argv)} failed: {proc.stderr[-2000:]}"
        return proc.stdout

    @staticmethod
    def build_loaded(home: Path, ref: str, base: str, archive: Path, tag: str) -> dict[str, Any]:
        """``modelpod build REF --output docker-archive:ARCHIVE --tag TAG --json`` in-process, then
        ``docker load``; the build's JSON report."""
        import contextlib
        import io

        from modelpod.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["--home", str(home), "build", ref, "--base", base, "--output", f"docker-archive:{archive}",
                       "--tag", tag, "--json"])
        assert rc == 0
        docker("load", "-i", str(archive))
        built: dict[str, Any] = json.loads(buf.getvalue())
        return built

    @staticmethod
    def cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, Any, str]:
        """``modelpod --home HOME ARGS --json`` in-process: (exit code, parsed stdout or None, stderr)."""
        from modelpod.cli import main

        capsys.readouterr()
        rc = main(["--home", str(home), *args, "--json"])
        out, err = capsys.readouterr()
        return rc, (json.loads(out) if rc == 0 and out.strip() else None), err


@pytest.fixture(scope="session")
def kit() -> type[Kit]:
    return Kit
