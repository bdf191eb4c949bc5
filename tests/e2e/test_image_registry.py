"""Images and pods through a real CNCF distribution registry on 127.0.0.1."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.api import load
from modelpod.errors import RegistryError, UnsafeArchiveError
from modelpod.image.artifact import file_groups, pull_pod
from modelpod.image.oci import DOCKER_LIST, OCI_MANIFEST, POD_LAYER, BlobStore, Descriptor, sha256_digest, to_json
from modelpod.image.registry import Reference, Registry
from modelpod.store import Store

pytestmark = pytest.mark.e2e
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)


@pytest.fixture
def cli(kit: Kit, capsys: pytest.CaptureFixture[str]) -> Any:
    return lambda home, *args: kit.cli(capsys, home, *args)


def test_build_push_mounts_the_base_and_skopeo_reads_it(sk_pod: Any, oci_registry: Any, oci_registry_base: str,
                                                         cli: Any, kit: Kit) -> None:
    target = oci_registry.repo("images/sk-lr:v1")
    rc, data, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", oci_registry_base, "--push", target)
    assert rc == 0, err
    moved = data["outputs"]["transfers"]
    # The base layer already sits in the base's repository: mounted, not sent again.
    assert moved["mounted"] == 1
    assert moved["uploaded"] == len(data["layers"])  # runtime, deps, weights, pod + the config
    inspect = json.loads(kit.run("skopeo", "inspect", "--tls-verify=false", f"docker://{target}"))
    assert inspect["Digest"] == data["digest"]
    assert inspect["Labels"]["dev.modelpod.digest"] == sk_pod.record.digest
    manifest = json.loads(kit.run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target}"))
    assert manifest["annotations"]["org.opencontainers.image.base.name"] == oci_registry_base

    rc, again, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", oci_registry_base, "--push", target)
    assert rc == 0, err
    assert again["digest"] == data["digest"]
    assert again["outputs"]["transfers"]["uploaded"] == 0
    assert again["outputs"]["transfers"]["mounted"] == 0


def test_pod_push_pull_round_trip_and_repush_sends_nothing(sk_pod: Any, oci_registry: Any, tmp_path: Path,
                                                            cli: Any) -> None:
    rc, pushed, err = cli(sk_pod.home, "push", "sk-lr:1", oci_registry.repo("pods/sk-lr"))
    assert rc == 0, err
    assert pushed["tags"] == ["1", "latest"]
    blobs = 1 + len(file_groups(sk_pod.record.manifest.files))  # the config, one layer per file group
    assert pushed["transfers"]["uploaded"] == blobs
    rc, again, err = cli(sk_pod.home, "push", "sk-lr:1", oci_registry.repo("pods/sk-lr"))
    assert rc == 0, err
    assert again["digest"] == pushed["digest"]
    assert again["transfers"]["uploaded"] == 0 and again["transfers"]["existing"] == blobs

    fresh = tmp_path / "fresh"
    rc, pulled, err = cli(fresh, "pull", oci_registry.repo("pods/sk-lr"))  # default tag: latest
    assert rc == 0, err
    assert pulled["digest"] == sk_pod.record.digest and pulled["version"] == 1
    rc, by_digest, err = cli(fresh, "pull", oci_registry.repo(f"pods/sk-lr@{pushed['digest']}"))
    assert rc == 0, err
    assert by_digest["version"] == 1  # the same pod is not stored twice
    theirs = load("sk-lr:1", store=Store(fresh))
    ours = load("sk-lr:1", store=sk_pod.store)
    got, want = theirs({"input-0": sk_pod.sample}), ours({"input-0": sk_pod.sample})
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])


def test_pull_refuses_a_file_the_manifest_does_not_list(sk_pod: Any, oci_registry: Any, tmp_path: Path) -> None:
    pod = sk_pod.store.open("sk-lr:1")
    blobs = BlobStore(tmp_path / "blobs")
    config = pod.manifest.canonical_bytes()
    config_desc = Descriptor("application/vnd.modelpod.pod.config.v1+json", blobs.put_bytes(config), len(config))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in pod.manifest.files:
            tar.add(pod.path / f.path, arcname=f.path)
        extra = tarfile.TarInfo("surprise.py")
        extra.size = 4
        tar.addfile(extra, io.BytesIO(b"boom"))
    layer = Descriptor(POD_LAYER, blobs.put_bytes(buf.getvalue()), len(buf.getvalue()))
    manifest = to_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "artifactType": "application/vnd.modelpod.pod.v1+json",
                        "config": config_desc.to_dict(), "layers": [layer.to_dict()]})
    ref = Reference.parse(oci_registry.repo("pods/evil:1"))
    client = Registry(ref.host)
    for d in (config_desc, layer):
        client.push_blob(ref.repository, d, blobs.path(d.digest))
    client.put_manifest(ref.repository, "1", manifest, OCI_MANIFEST)

    store = Store(tmp_path / "home")
    with pytest.raises(UnsafeArchiveError, match="surprise.py"):
        pull_pod(ref, Registry(ref.host), store)
    assert store.list() == []
    assert list(store.tmp.iterdir()) == []


def test_chunked_upload_and_cross_repository_mount(sk_pod: Any, oci_registry: Any, tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = np.random.default_rng(1).bytes(300_000)
    desc = Descriptor("application/octet-stream", blobs.put_bytes(data), len(data))
    first = Reference.parse(oci_registry.repo("chunks/a"))
    client = Registry(first.host, chunk_bytes=64 * 1024)
    assert client.push_blob(first.repository, desc, blobs.path(desc.digest)) == "uploaded"
    second = Reference.parse(oci_registry.repo("chunks/b"))
    assert client.push_blob(second.repository, desc, blobs.path(desc.digest),
                            mount_from=[first.repository]) == "mounted"
    fetched = BlobStore(tmp_path / "fetched")
    Registry(second.host).fetch_blob(second.repository, desc, fetched)
    assert fetched.path(desc.digest).read_bytes() == data


def test_unreachable_registry_is_a_one_line_error(sk_pod: Any, kit: Kit, cli: Any) -> None:
    dead = f"127.0.0.1:{kit.free_port()}"
    rc, _, err = cli(sk_pod.home, "push", "sk-lr:1", f"{dead}/pods/sk-lr")
    assert rc == 2
    assert err.startswith(f"error: cannot reach registry {dead}") and len(err.strip().splitlines()) == 1
    rc, _, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", f"{dead}/base/debian:bookworm")
    assert rc == 2 and "cannot reach registry" in err


def test_unknown_base_and_tag_are_named(sk_pod: Any, oci_registry: Any, cli: Any) -> None:
    rc, _, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", oci_registry.repo("base/nothing:here"))
    assert rc == 2 and "not found" in err and "base/nothing:here" in err
    rc, _, err = cli(sk_pod.home, "pull", oci_registry.repo("pods/nothing:here"))
    assert rc == 2 and "404" in err


def test_docker_schema2_and_manifest_list_bases(sk_pod: Any, oci_registry: Any, base_image: Any, cli: Any,
                                               kit: Kit, tmp_path: Path) -> None:
    """A base pushed by skopeo as docker schema 2, then wrapped in a two-platform manifest list."""
    v2s2 = oci_registry.repo("base/docker:v2s2")
    kit.run("skopeo", "copy", "--dest-tls-verify=false", "--format", "v2s2", base_image.oci, f"docker://{v2s2}")
    ref = Reference.parse(v2s2)
    client = Registry(ref.host)
    manifest, media = client.get_manifest(ref.repository, "v2s2")
    assert media == "application/vnd.docker.distribution.manifest.v2+json"
    entry = {"mediaType": media, "digest": sha256_digest(manifest), "size": len(manifest)}
    listing = to_json({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        {**entry, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        {**entry, "platform": {"architecture": "amd64", "os": "linux"}},
    ]})
    client.put_manifest(ref.repository, "list", listing, DOCKER_LIST)

    rc, from_oci, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", base_image.oci,
                            "--output", f"docker-archive:{tmp_path / 'a.tar'}")
    assert rc == 0, err
    for tag in ("v2s2", "list"):
        rc, data, err = cli(sk_pod.home, "build", "sk-lr:1", "--base", oci_registry.repo(f"base/docker:{tag}"),
                            "--output", f"docker-archive:{tmp_path / 'b.tar'}")
        assert rc == 0, err
        # The same bytes under docker's media types: the same layer digests, and so the same layers.
        assert [x["digest"] for x in data["layers"]] == [x["digest"] for x in from_oci["layers"]]
    rc, _, err = cli(sk_pod.home, "pull", oci_registry.repo("base/docker:v2s2"))
    assert rc == 2 and "not a modelpod pod" in err


def test_plain_http_only_for_loopback() -> None:
    client = Registry("registry.example.com")
    assert client.base == "https://registry.example.com"
    with pytest.raises(RegistryError, match="only loopback"):
        client._http("GET", "http://registry.example.com/v2/", {}, None, None)
