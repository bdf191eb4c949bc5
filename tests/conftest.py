"""Shared fixtures: tiny models trained here on synthetic data, and a store in a tmp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpod.store import Store


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
