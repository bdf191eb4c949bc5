from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fwutil import Check, assert_store_empty, evil_pickle, sig

import modelpod
from modelpod.cli import main
from modelpod.errors import FrameworkError, PodError, UnsafeModelError
from modelpod.frameworks import detect
from modelpod.frameworks import python as adapter
from modelpod.packing import pack
from modelpod.store import Store

TYPED = '''
from modelpod import Model

from helpers import SCALE


class Lengths(Model):
    def load(self) -> None:
        self.scale = SCALE
        super().load()

    def predict(self, text: list[str]) -> list[float]:
        return [len(t) * self.scale for t in text]
'''

ARRAYS = '''
from typing import Annotated, TypedDict

import numpy as np

import modelpod
from modelpod.frameworks.python import Tensor


class Out(TypedDict):
    total: Annotated[np.ndarray, Tensor("FP64", (-1,))]
    flags: list[bool]
    names: list[str]


class Stats(modelpod.Model):
    def predict(self, x: Annotated[np.ndarray, Tensor("FP32", (-1, 4))], ids: list[int],
                raw: list[bytes]) -> Out:
        assert isinstance(x, np.ndarray) and isinstance(ids, list) and isinstance(raw[0], bytes)
        total = x.astype(np.float64).sum(axis=1) + np.asarray(ids)
        return {"total": total, "flags": [bool(t > 0) for t in total], "names": [r.decode().upper() for r in raw]}
'''

BATCH = '''
import numpy as np
from modelpod import Model


class Doubler(Model):
    def predict(self, inputs):
        (x,) = inputs.values()
        return {"doubled": np.asarray(x) * 2}
'''


def code_dir(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_type_hints_are_the_schema(tmp_path: Path, store: Store, check_pod: Check) -> None:
    d = code_dir(tmp_path / "lengths", {"predict.py": TYPED, "helpers.py": "SCALE = 2.0\n"})
    assert detect(d) == "python"
    rec = pack(d, "lengths", store)  # no sample: the hints give the signature
    assert rec.manifest.entrypoint == "predict:Lengths"
    # list[float] is FP64: Python floats are 64-bit.
    assert sig(rec) == {"inputs": [("text", "BYTES", [-1])], "outputs": [("output-0", "FP64", [-1])]}
    assert {f.role for f in rec.manifest.files} == {"code"}
    out = check_pod(rec, np.array(["a", "héllo", ""]), {"output-0": np.array([2.0, 10.0, 0.0], np.float64)})
    assert out["output-0"].dtype == np.float64


def test_annotated_arrays_and_typeddict_outputs(tmp_path: Path, store: Store, check_pod: Check,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    d = code_dir(tmp_path / "stats", {"model.py": ARRAYS})
    code = main(["--home", str(store.home), "pack", str(d), "--name", "stats", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["framework"] == "python"
    rec = store.get("stats")
    assert sig(rec) == {
        "inputs": [("x", "FP32", [-1, 4]), ("ids", "INT64", [-1]), ("raw", "BYTES", [-1])],
        "outputs": [("total", "FP64", [-1]), ("flags", "BOOL", [-1]), ("names", "BYTES", [-1])],
    }
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inputs = {"x": x, "ids": np.array([1, -100]), "raw": np.array([b"ab", b"c"], dtype=object)}
    check_pod(rec, inputs, {"total": np.array([7.0, -78.0]), "flags": np.array([True, False]),
                            "names": np.array(["AB", "C"])})


def test_base_predict_with_sample_and_module_hygiene(tmp_path: Path, store: Store, check_pod: Check) -> None:
    d = code_dir(tmp_path / "doubler", {"serve.py": BATCH})
    x = np.ones((3, 2), np.float32)
    with pytest.raises(PodError, match="--sample"):
        pack(d, "doubler", store)
    rec = pack(d, "doubler", store, sample=x)
    assert sig(rec) == {"inputs": [("input-0", "FP32", [-1, 2])], "outputs": [("doubled", "FP32", [-1, 2])]}
    path_before = list(sys.path)
    loaded = {m for m in sys.modules if m.startswith("modelpod_user_")}  # other tests' models may still be loaded
    check_pod(rec, {"input-0": x}, {"doubled": x * 2})
    assert sys.path == path_before
    assert not [m for m in sys.modules if m.startswith("modelpod_user_") and m not in loaded]  # unload forgets it


def test_two_pods_with_the_same_helper_module_do_not_collide(tmp_path: Path, store: Store) -> None:
    one = code_dir(tmp_path / "one", {"predict.py": TYPED, "helpers.py": "SCALE = 1.0\n"})
    two = code_dir(tmp_path / "two", {"predict.py": TYPED, "helpers.py": "SCALE = 10.0\n"})
    pack(one, "one", store)
    pack(two, "two", store)
    a, b = modelpod.load("one", store=store), modelpod.load("two", store=store)
    assert "helpers" not in sys.modules
    text = np.array(["abc"])
    assert a(text)["output-0"].tolist() == [3.0] and b(text)["output-0"].tolist() == [30.0]
    a.unload()
    b.unload()


def test_entrypoint_choice(tmp_path: Path, store: Store) -> None:
    d = code_dir(tmp_path / "two", {"a.py": TYPED.replace("from helpers import SCALE", "SCALE = 1"),
                                    "b.py": BATCH})
    with pytest.raises(FrameworkError, match="found 2: a:Lengths, b:Doubler.*--entrypoint"):
        pack(d, "m", store)
    rec = pack(d, "m", store, entrypoint="a:Lengths")
    assert rec.manifest.entrypoint == "a:Lengths"
    with pytest.raises(FrameworkError, match="no nope.py"):
        pack(d, "m", store, entrypoint="nope:Thing")
    with pytest.raises(FrameworkError, match="not a modelpod.Model subclass"):
        pack(d, "m", store, entrypoint="a:SCALE")


@pytest.mark.parametrize(("params", "message"), [
    ("x: np.ndarray", "Tensor"),
    ("x: float", "not supported"),
    ("x: list[str], *rest", "args"),
    ("x, y: list[int]", "annotate"),
])
def test_unusable_hints_are_explained(tmp_path: Path, store: Store, params: str, message: str) -> None:
    src = f"""
import numpy as np
from modelpod import Model

class M(Model):
    def predict(self, {params}):
        return x
"""
    d = code_dir(tmp_path / "bad", {"m.py": src})
    with pytest.raises(FrameworkError, match=message):
        pack(d, "bad", store)
    assert_store_empty(store)


def test_tensor_marker_validates() -> None:
    assert adapter.Tensor("INT8", (-1, 2)).shape == (-1, 2)
    with pytest.raises(PodError, match="unknown datatype"):
        adapter.Tensor("FLOAT", (-1,))


def test_pickles_in_the_code_directory(tmp_path: Path, store: Store) -> None:
    d = code_dir(tmp_path / "withpickle", {"predict.py": TYPED, "helpers.py": "SCALE = 1.0\n"})
    evil_pickle(d / "state.pkl")
    with pytest.raises(UnsafeModelError, match="--allow-pickle"):
        pack(d, "m", store)
    with pytest.raises(UnsafeModelError, match="system"):
        pack(d, "m", store, allow_pickle=True)
    assert_store_empty(store)


def test_import_errors_are_one_line(tmp_path: Path, store: Store) -> None:
    d = code_dir(tmp_path / "broken", {"predict.py": "import modelpod\nclass M(modelpod.Model):\n    x = 1/0\n"})
    with pytest.raises(FrameworkError) as info:
        pack(d, "m", store)
    assert "predict.py" in str(info.value) and "ZeroDivisionError" in str(info.value)
    assert "\n" not in str(info.value)


def test_detect_leaves_other_formats_alone(tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "train.py").write_text("print('training script')\n")
    (d / "model.onnx").write_bytes(b"\x08\x07")
    assert not adapter.detect(d)
    (d / "serve.py").write_text("from modelpod import Model\n")
    assert adapter.detect(d)
