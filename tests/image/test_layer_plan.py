"""The layer plan: which files go where, which wheels, which platform tags."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from modelpod.errors import ImageError
from modelpod.image.artifact import file_groups
from modelpod.image.plan import core_pins, pod_layers
from modelpod.image.wheels import Pin, Target, WheelSet, find_cached
from modelpod.pod import FileEntry, Manifest, Pod, read_record


def _pod(tmp_path: Path, files: list[tuple[str, int, str]]) -> Pod:
    entries = []
    for path, size, role in files:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x" * size)
        entries.append(FileEntry(path, "0" * 64, size, role))
    return Pod(tmp_path, Manifest(name="p", framework="python", files=tuple(entries), python="3.11"))


def test_large_weights_get_their_own_layers(tmp_path: Path) -> None:
    pod = _pod(tmp_path, [("model/big.bin", 2000, "weights"), ("model/vocab.txt", 1500, "data"),
                          ("model/small.bin", 10, "weights"), ("code/m.py", 10, "code"),
                          ("model/config.json", 10, "config")])
    specs = pod_layers(pod, threshold=1000)
    assert [(s.role, s.title) for s in specs] == [
        ("weights", "weights model/big.bin"), ("weights", "weights model/vocab.txt"),
        ("weights", "weights (1 files)"), ("pod", "manifest + code (2 files)")]
    with specs[-1].entries() as entries:
        assert sorted(e.path for e in entries) == [
            "opt/modelpod/pod/code/m.py", "opt/modelpod/pod/model/config.json", "opt/modelpod/pod/modelpod.yaml",
            "tmp"]
        assert next(e for e in entries if e.path == "tmp").mode == 0o1777  # the image's writable place
    with pod_layers(pod, 1000, {"digest": pod.digest, "version": 3, "aliases": ["production"]})[-1].entries() as got:
        record = next(e for e in got if e.path == "opt/modelpod/pod/modelpod.record.json")
        assert record.source is not None
        with record.source.open() as fh:
            assert json.loads(fh.read()) == {"digest": pod.digest, "version": 3, "aliases": ["production"]}
    assert read_record(tmp_path, pod.manifest) == (None, ())
    (tmp_path / "modelpod.record.json").write_text(json.dumps({"digest": pod.digest, "version": 3, "aliases": ["a"]}))
    assert read_record(tmp_path, pod.manifest) == (3, ("a",))
    (tmp_path / "modelpod.record.json").write_text(json.dumps({"digest": "sha256:" + "0" * 64, "version": 3}))
    assert read_record(tmp_path, pod.manifest) == (None, ())  # another pod's record is ignored
    groups = file_groups(pod.manifest.files, threshold=1000)
    assert [title for title, _ in groups] == ["model/big.bin", "model/vocab.txt", "weights", "files"]


def test_layer_keys_follow_content_not_location(tmp_path: Path) -> None:
    a = pod_layers(_pod(tmp_path / "a", [("w.bin", 10, "weights")]))
    b = pod_layers(_pod(tmp_path / "b", [("w.bin", 10, "weights")]))
    assert [s.key for s in a] == [s.key for s in b]


def test_target_platform_tags() -> None:
    target = Target("3.11", "x86_64", (2, 36))
    assert target.platforms[0] == "manylinux_2_36_x86_64"
    assert target.platforms[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    args = target.pip_args()
    assert args[-5:] == ["--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:"]
    assert args.count("--platform") == len(target.platforms)
    tags = {str(t) for t in target.tags()}
    assert "cp311-cp311-manylinux_2_28_x86_64" in tags and "cp311-abi3-manylinux_2_17_x86_64" in tags
    assert "py3-none-any" in tags and not any("musllinux" in t or "macosx" in t for t in tags)


def test_pins_must_be_exact() -> None:
    assert Pin.parse("Scikit_Learn==1.5.0") == Pin("scikit-learn", "1.5.0", "Scikit_Learn==1.5.0")
    with pytest.raises(ImageError, match="not pinned"):
        Pin.parse("numpy>=1")


def test_core_pins_are_what_serving_imports() -> None:
    names = {p.name for p in core_pins(Target("3.11"))}
    assert {"numpy", "pyyaml", "httptools", "uvloop", "orjson", "grpcio", "protobuf"} <= names
    # the CLI's table printer, the old ASGI server and pack/build's requirement parser stay out
    assert not names & {"rich", "uvicorn", "packaging", "scikit-learn", "modelpod"}
    slim = {p.name for p in core_pins(Target("3.11"), grpc=False)}
    assert "grpcio" not in slim and "protobuf" not in slim and "numpy" in slim


def test_wheels_unpack_into_site_packages_without_scripts_or_bytecode(tmp_path: Path) -> None:
    whl = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("demo/", "")
        z.writestr("demo/__init__.py", "")
        z.writestr("demo/__pycache__/__init__.cpython-311.pyc", "x")
        z.writestr("demo-1.0.data/purelib/demo_extra.py", "")
        z.writestr("demo-1.0.data/scripts/demo", "#!python")
        z.writestr("demo-1.0.dist-info/METADATA", "Name: demo")
    with WheelSet([whl]) as ws:
        paths = sorted(e.path for e in ws.entries("opt/site"))
    assert paths == ["opt/site/demo-1.0.dist-info/METADATA", "opt/site/demo/__init__.py", "opt/site/demo_extra.py"]
    assert find_cached(Pin.parse("demo==1.0"), Target("3.11"), tmp_path) == whl
    assert find_cached(Pin.parse("demo==1.1"), Target("3.11"), tmp_path) is None


def test_unsafe_wheel_paths_are_refused(tmp_path: Path) -> None:
    whl = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("../escape.py", "")
    with WheelSet([whl]) as ws, pytest.raises(ImageError, match="unsafe"):
        ws.entries("opt/site")
