from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fwutil import Check, mlp_numpy, onnx_mlp, sig

from modelpod.cli import main
from modelpod.errors import FrameworkError, UsageError
from modelpod.frameworks import detect
from modelpod.packing import pack
from modelpod.store import Store


def test_skl2onnx_classifier(store: Store, check_pod: Check, skl2onnx_model: tuple[Path, np.ndarray, Any]) -> None:
    import onnxruntime as ort

    path, x, est = skl2onnx_model
    assert detect(path) == "onnx"
    rec = pack(path, "lr", store)  # the graph carries the signature
    assert sig(rec) == {
        "inputs": [("features", "FP32", [-1, 5])],
        "outputs": [("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 2])],
    }
    label, proba = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"features": x})
    out = check_pod(rec, x, {"label": label, "probabilities": proba})
    np.testing.assert_allclose(out["probabilities"], est.predict_proba(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["label"], est.predict(x))


def test_helper_graph_via_cli(tmp_path: Path, store: Store, check_pod: Check,
                              capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    path = tmp_path / "mlp.onnx"
    onnx.save(onnx_mlp(), str(path))
    code = main(["--home", str(store.home), "pack", str(path), "--name", "mlp", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["framework"] == "onnx"
    rec = store.get("mlp")
    # The symbolic "batch" dimension becomes free.
    assert sig(rec) == {"inputs": [("x", "FP32", [-1, 4])], "outputs": [("y", "FP32", [-1, 3])]}
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    check_pod(rec, x, {"y": mlp_numpy(x)}, rtol=1e-5, atol=1e-5)


def test_external_data_files_travel_with_the_model(tmp_path: Path, store: Store, check_pod: Check) -> None:
    import onnx

    src = tmp_path / "src"
    src.mkdir()
    onnx.save(onnx_mlp(), str(src / "mlp.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="mlp.weights", size_threshold=0)
    (src / "unrelated.txt").write_text("not part of the model")
    rec = pack(src / "mlp.onnx", "mlp", store)
    assert sorted(f.path for f in rec.manifest.files) == ["model/mlp.onnx", "model/mlp.weights"]
    x = np.ones((2, 4), np.float32)
    check_pod(rec, x, {"y": mlp_numpy(x)}, rtol=1e-5, atol=1e-5)


def test_missing_external_data_is_named(tmp_path: Path, store: Store) -> None:
    import onnx

    onnx.save(onnx_mlp(), str(tmp_path / "mlp.onnx"), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(FrameworkError, match="external data file w.bin is missing"):
        pack(tmp_path / "mlp.onnx", "mlp", store)
    assert store.list() == []


def test_string_tensors_are_bytes(tmp_path: Path, store: Store, check_pod: Check) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "echo",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])],
    )
    path = tmp_path / "echo.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    rec = pack(path, "echo", store)
    assert sig(rec) == {"inputs": [("s", "BYTES", [-1])], "outputs": [("t", "BYTES", [-1])]}
    out = check_pod(rec, np.array(["héllo", "world"]), {"t": np.array(["héllo", "world"])})
    assert all(isinstance(v, bytes) for v in out["t"])


def test_damaged_model_is_one_line_naming_the_file(tmp_path: Path, store: Store) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf graph")
    with pytest.raises(FrameworkError) as info:
        pack(bad, "m", store)
    assert "broken.onnx" in str(info.value) and "\n" not in str(info.value)
    assert store.list() == []


def test_outputs_flag_is_refused_where_the_model_names_its_outputs(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(onnx_mlp().SerializeToString())
    with pytest.raises(UsageError, match="--outputs is not supported for onnx pods"):
        pack(path, "mlp", store, outputs=["label"])
    assert store.list() == []
