from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpod.errors import IntegrityError, PodError, SignatureError
from modelpod.pod import (
    MANIFEST_NAME,
    Manifest,
    Pod,
    Signature,
    TensorSpec,
    datatype_of,
    scan_files,
    write_manifest,
)


def _pod(tmp_path: Path) -> Pod:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"weights" * 100)
    (tmp_path / "code.py").write_text("x = 1\n")
    files = scan_files(tmp_path, {"code.py": "code"})
    manifest = Manifest(name="m", framework="python", files=tuple(files),
                        signature=Signature((TensorSpec("x", "FP32", (-1, 3)),), ()))
    write_manifest(tmp_path, manifest)
    return Pod.open(tmp_path)


def test_manifest_round_trips_and_digest_is_canonical(tmp_path: Path) -> None:
    pod = _pod(tmp_path)
    again = Manifest.from_yaml((tmp_path / MANIFEST_NAME).read_text())
    assert again == pod.manifest
    assert again.digest == pod.digest and pod.digest.startswith("sha256:")
    roles = {f.path: f.role for f in pod.manifest.files}
    assert roles == {"code.py": "code", "model/w.bin": "weights"}


def test_digest_changes_with_any_field(tmp_path: Path) -> None:
    pod = _pod(tmp_path)
    from dataclasses import replace

    assert replace(pod.manifest, labels={"a": "b"}).digest != pod.digest
    assert replace(pod.manifest, requirements=("numpy==1",)).digest != pod.digest


def test_tampered_file_is_named(tmp_path: Path) -> None:
    _pod(tmp_path)
    (tmp_path / "model" / "w.bin").write_bytes(b"Weights" * 100)  # same size, other bytes
    with pytest.raises(IntegrityError, match="model/w.bin") as err:
        Pod.open(tmp_path)
    assert err.value.path == "model/w.bin"


def test_missing_and_resized_files_are_named(tmp_path: Path) -> None:
    _pod(tmp_path)
    (tmp_path / "code.py").write_text("x = 22\n")
    with pytest.raises(IntegrityError, match="code.py: size"):
        Pod.open(tmp_path)
    (tmp_path / "code.py").unlink()
    with pytest.raises(IntegrityError, match="code.py: missing"):
        Pod.open(tmp_path)


def test_tampered_manifest_is_refused_against_recorded_digest(tmp_path: Path) -> None:
    pod = _pod(tmp_path)
    text = (tmp_path / MANIFEST_NAME).read_text().replace("framework: python", "framework: sklearn")
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(IntegrityError, match=MANIFEST_NAME):
        Pod.open(tmp_path, expected_digest=pod.digest)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "a\\b", "", "a//b", MANIFEST_NAME])
def test_unsafe_paths_in_manifest_are_refused(bad: str) -> None:
    from modelpod.pod import FileEntry

    with pytest.raises(PodError):
        FileEntry.from_dict({"path": bad, "sha256": "0" * 64, "size": 1})


def test_links_are_not_packed(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(PodError, match="link"):
        scan_files(tmp_path)


@pytest.mark.parametrize("name", ["Upper", "-x", "a b", "x" * 200, ""])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(PodError, match="bad pod name"):
        Manifest(name=name, framework="x", files=())


def test_tensor_spec_shape_matching() -> None:
    spec = TensorSpec("x", "FP32", (-1, 3))
    assert spec.accepts_shape((5, 3)) and not spec.accepts_shape((5, 4)) and not spec.accepts_shape((3,))
    with pytest.raises(SignatureError, match="datatype"):
        spec.check("INT64", (1, 3))
    with pytest.raises(SignatureError):
        TensorSpec("x", "FLOAT", (1,))


def test_datatypes_of_arrays() -> None:
    assert datatype_of(np.zeros(2, np.float32)) == "FP32"
    assert datatype_of(np.array(["a"])) == "BYTES"
    assert datatype_of(np.array([b"a"], dtype=object)) == "BYTES"
    assert datatype_of(np.zeros(2, ">i8")) == "INT64"
    assert TensorSpec.of("x", np.zeros((4, 2), np.int32)) == TensorSpec("x", "INT32", (-1, 2))


def test_unknown_schema_is_refused() -> None:
    with pytest.raises(PodError, match="schema"):
        Manifest.from_dict({"schema": "other/v9", "name": "a", "framework": "b"})
    with pytest.raises(PodError, match="YAML"):
        Manifest.from_yaml("a: [")
