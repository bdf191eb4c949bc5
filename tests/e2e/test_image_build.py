"""modelpod build, end to end: layouts that skopeo and umoci accept, reproducible and incremental."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.archive import export, import_archive
from modelpod.image.builder import iso
from modelpod.store import Store

pytestmark = pytest.mark.e2e
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)


@pytest.fixture
def build(kit: Kit, capsys: pytest.CaptureFixture[str]) -> Any:
    return lambda home, *args: kit.cli(capsys, home, "build", *args)


def test_layout_is_accepted_by_skopeo_and_umoci(sk_pod: Any, base_image: Any, tmp_path: Path,
                                                 build: Any, kit: Kit) -> None:
    out = tmp_path / "layout"
    rc, data, err = build(sk_pod.home, "sk-lr:1", "--base", base_image.oci, "--output", f"oci:{out}:v1")
    assert rc == 0, err
    roles = [layer["role"] for layer in data["layers"]]
    assert roles == ["base", "runtime", "deps", "weights", "pod"]
    assert "gRPC" in data["layers"][1]["title"]
    assert data["python"] == "/usr/bin/python3.11"

    inspect = json.loads(kit.run("skopeo", "inspect", f"oci:{out}:v1"))
    assert inspect["Digest"] == data["digest"]
    assert inspect["Layers"] == [layer["digest"] for layer in data["layers"]]
    assert inspect["Labels"]["dev.modelpod.digest"] == sk_pod.record.digest
    config = json.loads(kit.run("skopeo", "inspect", "--config", f"oci:{out}:v1"))["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/bin/python3.11", "-m", "modelpod.entry", "/opt/modelpod/pod"]
    assert "Cmd" not in config
    assert set(config["ExposedPorts"]) == {"8080/tcp", "8081/tcp"}  # REST and gRPC
    assert config["Volumes"] == {"/tmp": {}}  # writable under docker run --read-only
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["MODELPOD_PORT"] == "8080" and env["MODELPOD_HOST"] == "0.0.0.0"
    assert env["PYTHONPATH"] == "/opt/modelpod/deps:/opt/modelpod/runtime"

    manifest = json.loads((out / "blobs" / "sha256" / data["digest"][7:]).read_bytes())
    notes = manifest["annotations"]
    # the pod's pack time (in its lineage, so reproducible), not the epoch: no "created 56 years ago"
    packed = sk_pod.record.manifest.lineage["created"]
    assert notes["org.opencontainers.image.created"] == iso(packed) != "1970-01-01T00:00:00Z"
    assert data["load_check"] == "passed"
    assert notes["org.opencontainers.image.title"] == "sk-lr"
    assert notes["org.opencontainers.image.version"] == "1"
    assert notes["org.opencontainers.image.revision"] == sk_pod.record.digest
    assert notes["org.opencontainers.image.base.digest"] == base_image.digest

    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    kit.run("umoci", "unpack", *rootless, "--image", f"{out}:v1", str(bundle))
    rootfs = bundle / "rootfs"
    pod = rootfs / "opt/modelpod/pod"
    assert (pod / "modelpod.yaml").read_text() == sk_pod.record.manifest.to_yaml()
    for f in sk_pod.record.manifest.files:
        assert (pod / f.path).stat().st_size == f.size
    assert (rootfs / "opt/modelpod/runtime/modelpod/__main__.py").is_file()
    assert (rootfs / "opt/modelpod/deps/sklearn").is_dir()
    assert (rootfs / "opt/modelpod/runtime/grpc").is_dir()
    assert not (rootfs / "opt/modelpod/runtime/rich").exists()
    assert json.loads((pod / "modelpod.record.json").read_text()) == {
        "aliases": [], "digest": sk_pod.record.digest, "version": 1}
    assert not list((rootfs / "opt/modelpod").rglob("*.pyc"))
    assert not list((rootfs / "opt/modelpod").rglob("__pycache__"))
    runtime = json.loads((bundle / "config.json").read_text())
    assert runtime["process"]["args"] == config["Entrypoint"]
    assert runtime["process"]["user"]["uid"] == 65532


def test_same_pod_and_base_give_the_same_digest(sk_pod: Any, base_image: Any, tmp_path: Path,
                                                build: Any, kit: Kit,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rc, first, err = build(sk_pod.home, "sk-lr:1", "--base", base_image.oci,
                           "--output", f"oci:{tmp_path / 'one'}")
    assert rc == 0, err
    # A second machine, as far as we can tell: the pod moved by archive into a fresh store, a cold
    # layer cache (only downloaded wheels shared), another directory, a later time.
    other = tmp_path / "elsewhere"
    kit.shared_wheels(other)
    export(sk_pod.store.open("sk-lr:1"), tmp_path / "pod.tar")
    rec = import_archive(tmp_path / "pod.tar", Store(other))
    assert rec.digest == sk_pod.record.digest and rec.version == 1
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base_image.layout, tmp_path / "base-copy")
    rc, second, err = build(other, "sk-lr:1", "--base", "oci:base-copy:bookworm", "--output", "oci:two")
    assert rc == 0, err
    assert not any(layer["cached"] for layer in second["layers"] if layer["role"] != "base")
    assert second["digest"] == first["digest"]
    assert [layer["digest"] for layer in second["layers"]] == [layer["digest"] for layer in first["layers"]]
    assert (tmp_path / "two" / "index.json").read_bytes() == (tmp_path / "one" / "index.json").read_bytes()


def test_new_weights_change_only_the_weights_and_manifest_layers(
        sk_pod: Any, base_image: Any, tmp_path: Path, build: Any, kit: Kit) -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    from modelpod.packing import pack

    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 20)).astype(np.float32)
    est = LogisticRegression().fit(x, (x[:, 2] > 0).astype(np.int64))
    sio.dump(est, tmp_path / "model.skops")
    v2 = pack(tmp_path / "model.skops", "sk-lr-next", sk_pod.store, sample=sk_pod.sample)
    v1 = sk_pod.store.add(sk_pod.store.open("sk-lr:1").path, replace(sk_pod.record.manifest, name="sk-lr-next"))
    assert v2.manifest.requirements == v1.manifest.requirements
    outputs = []
    for rec in (v1, v2):
        rc, data, err = build(sk_pod.home, rec.ref, "--base", base_image.oci,
                              "--output", f"oci:{tmp_path / 'img'}:{rec.version}")
        assert rc == 0, err
        outputs.append(data["layers"])
    old, new = outputs
    assert [layer["role"] for layer in old] == [layer["role"] for layer in new]
    changed = [b["role"] for a, b in zip(old, new, strict=True) if a["digest"] != b["digest"]]
    # The manifest lists the weights' hashes, so its small layer changes with them; nothing else does.
    assert changed == ["weights", "pod"]
    assert new[-1]["size"] < 8192  # the manifest and the small drift reference made from the sample
    assert all(layer["cached"] for layer in new if layer["role"] in ("runtime", "deps"))


def test_python_version_mismatch_is_a_clear_image_error(sk_pod: Any, base_image: Any,
                                                        build: Any, kit: Kit) -> None:
    pod = sk_pod.store.open("sk-lr:1")
    sk_pod.store.add(pod.path, replace(pod.manifest, name="sk-py312", python="3.12"))
    rc, _, err = build(sk_pod.home, "sk-py312", "--base", base_image.oci)
    assert rc == 2
    assert "Python 3.11 (/usr/bin/python3.11)" in err and "needs Python 3.12" in err
    assert len(err.strip().splitlines()) == 1


def test_sdist_only_dependency_is_named(sk_pod: Any, base_image: Any, tmp_path: Path,
                                        build: Any, kit: Kit) -> None:
    pod = sk_pod.store.open("sk-lr:1")
    manifest = replace(pod.manifest, name="sk-sdist", requirements=(*pod.manifest.requirements, "docopt==0.6.2"))
    sk_pod.store.add(pod.path, manifest)
    rc, _, err = build(sk_pod.home, "sk-sdist", "--base", base_image.oci,
                       "--output", f"oci:{tmp_path / 'never'}")
    assert rc == 2
    assert err.startswith("error: no wheel of docopt==0.6.2 for CPython 3.11")
    assert not (tmp_path / "never").exists()


def test_bad_bases_are_one_line_errors(sk_pod: Any, tmp_path: Path, build: Any, kit: Kit) -> None:
    rc, _, err = build(sk_pod.home, "sk-lr:1", "--base", f"oci:{tmp_path / 'nothing'}")
    assert rc == 2 and "not an OCI image layout" in err
    rc, _, err = build(sk_pod.home, "sk-lr:1", "--base", f"docker-archive:{tmp_path / 'none.tar'}")
    assert rc == 2 and "no such file" in err


def test_docker_archive_base_gives_the_same_layers(sk_pod: Any, base_image: Any, tmp_path: Path,
                                                   build: Any, kit: Kit) -> None:
    rc, from_layout, err = build(sk_pod.home, "sk-lr:1", "--base", base_image.oci,
                                 "--output", f"docker-archive:{tmp_path / 'a.tar'}")
    assert rc == 0, err
    rc, from_archive, err = build(sk_pod.home, "sk-lr:1", "--base", f"docker-archive:{base_image.archive}",
                                  "--output", f"docker-archive:{tmp_path / 'b.tar'}")
    assert rc == 0, err
    assert [x["digest"] for x in from_archive["layers"]] == [x["digest"] for x in from_layout["layers"]]
