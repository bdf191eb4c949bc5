"""Shared fixtures: tiny models trained here on synthetic data, and a store in a tmp dir."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from modelpod.store import PodRecord, Store

# The serving, protocol and `serve` end-to-end tests share helpers in tests/serving/servutil.py.
sys.path.insert(0, str(Path(__file__).resolve().parent / "serving"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


@pytest.fixture(scope="session")
def sklearn_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, object]:
    """A LogisticRegression on 20 synthetic features, saved with skops; (path, sample, estimator)."""
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    est = LogisticRegression().fit(x, y)
    d = tmp_path_factory.mktemp("sk")
    path = d / "model.skops"
    sio.dump(est, path)
    return path, x[:5], est


@pytest.fixture(scope="session")
def served_home(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, object]
                ) -> tuple[Path, PodRecord]:
    """A store holding the LogisticRegression as pod ``lr`` (version 1, alias ``production``)."""
    from modelpod.api import pack

    path, sample, _ = sklearn_model
    home = tmp_path_factory.mktemp("served")
    store = Store(home)
    rec = pack(path, "lr", store=store, sample=sample)
    store.tag(rec.name, rec.version, "production")
    return home, rec


@pytest.fixture(scope="session")
def shapes_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """examples/detector.py run once per session: (the example module, its output directory holding
    ``shapes.onnx`` trained on synthetic shapes, ``sample.jpg`` and ``sample.json``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "detector_example", Path(__file__).resolve().parents[1] / "examples" / "detector.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("shapes")
    assert module.main(["--out", str(out)]) == 0
    return module, out
