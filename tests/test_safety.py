from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest

from modelpod.errors import UnsafeModelError
from modelpod.safety import check_load_allowed, keras_code_objects, looks_like_pickle, refuse_pickle, scan_pickle


class _Shell:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, ("echo pwned",)


class _Eval:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return eval, ("1 + 1",)


def _dump(path: Path, obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)
    return path


def test_refusal_says_why_and_how_to_opt_in(tmp_path: Path) -> None:
    msg = str(refuse_pickle(tmp_path / "m.pkl", "a pickled model"))
    assert msg.startswith("m.pkl: a pickled model runs code when it is loaded")
    assert "--allow-pickle" in msg and "\n" not in msg


@pytest.mark.parametrize("payload", [_Shell(), _Eval()])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_scan_refuses_code_execution(tmp_path: Path, payload: Any, protocol: int) -> None:
    path = _dump(tmp_path / "evil.pkl", {"weights": [1.0], "x": payload}, protocol)
    with pytest.raises(UnsafeModelError, match=r"refused: the pickle imports .*(system|eval)"):
        scan_pickle(path)


def test_scan_passes_plain_data(tmp_path: Path) -> None:
    scan_pickle(_dump(tmp_path / "ok.pkl", {"weights": [1.0, 2.0], "name": "m", "n": (1, 2)}))


def test_scan_looks_inside_zip_archives(tmp_path: Path) -> None:
    # torch.save writes a zip holding data.pkl: the pickle inside must be scanned too.
    inner = pickle.dumps({"x": _Shell()}, protocol=2)
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", inner)
        zf.writestr("model/version", "3")
    with pytest.raises(UnsafeModelError, match="system"):
        scan_pickle(path)


def test_load_needs_the_recorded_opt_in(tmp_path: Path) -> None:
    path = _dump(tmp_path / "ok.pkl", [1, 2, 3])
    with pytest.raises(UnsafeModelError, match="did not opt in.*--allow-pickle"):
        check_load_allowed(path, False, "a pickle")
    check_load_allowed(path, True, "a pickle")
    evil = _dump(tmp_path / "evil.pkl", _Shell())
    with pytest.raises(UnsafeModelError, match="system"):
        check_load_allowed(evil, True, "a pickle")  # the opt-in never skips the scan


def test_looks_like_pickle(tmp_path: Path) -> None:
    assert looks_like_pickle(_dump(tmp_path / "a.bin", [1], protocol=2))
    assert looks_like_pickle(_dump(tmp_path / "b.dat", [1], protocol=5))
    with zipfile.ZipFile(tmp_path / "c.pt", "w") as zf:
        zf.writestr("c/data.pkl", pickle.dumps([1]))
    assert looks_like_pickle(tmp_path / "c.pt")
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as zf:  # TorchScript: torch's own unpickler
        zf.writestr("s/data.pkl", b"")
        zf.writestr("s/constants.pkl", b"")
        zf.writestr("s/code/__torch__/m.py", "")
    assert not looks_like_pickle(tmp_path / "script.pt")
    (tmp_path / "d.txt").write_text("hello")
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr("readme.txt", "no pickles here")
    assert not looks_like_pickle(tmp_path / "d.txt")
    assert not looks_like_pickle(tmp_path / "e.zip")
    assert not looks_like_pickle(tmp_path / "missing")


def test_keras_code_objects() -> None:
    config = {
        "class_name": "Sequential",
        "config": {"layers": [
            {"class_name": "Dense", "config": {"name": "dense"}},
            {"class_name": "Lambda", "config": {"name": "double", "function": {
                "class_name": "__lambda__", "config": {"code": "4wEAAA=="}}}},
        ]},
    }
    assert keras_code_objects(config) == ["Lambda double", "__lambda__"]
    assert keras_code_objects({"class_name": "Dense", "config": {"name": "d"}}) == []
