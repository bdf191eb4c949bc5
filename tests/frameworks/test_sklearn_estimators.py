"""Every classifier and regressor in scikit-learn's ``all_estimators()`` packs as it is and predicts.

Tiny synthetic data, one estimator at a time, nothing in parallel. Meta-estimators get a small
base estimator; the few that need inputs of another kind are skipped, each with its reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.frameworks import sklearn as adapter
from modelpod.packing import pack
from modelpod.store import Store

pytest.importorskip("skops")

# name -> why it cannot take a small numeric table and a 1-D target.
SKIPPED = {
    "IsotonicRegression": "takes a single feature",
    "MultiTaskElasticNet": "needs a 2-D target",
    "MultiTaskElasticNetCV": "needs a 2-D target",
    "MultiTaskLasso": "needs a 2-D target",
    "MultiTaskLassoCV": "needs a 2-D target",
    "ClassifierChain": "needs a 2-D (multi-label) target",
    "RegressorChain": "needs a 2-D target",
    "MultiOutputClassifier": "needs a 2-D (multi-label) target",
    "MultiOutputRegressor": "needs a 2-D target",
}


def _params(name: str) -> dict[str, Any]:
    """Constructor arguments for estimators that need some (meta-estimators: a small base)."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    clf, reg = DecisionTreeClassifier(max_depth=2), DecisionTreeRegressor(max_depth=2)
    table: dict[str, dict[str, Any]] = {
        "OneVsOneClassifier": {"estimator": LogisticRegression()},
        "OneVsRestClassifier": {"estimator": clf},
        "OutputCodeClassifier": {"estimator": clf, "random_state": 0},
        "FixedThresholdClassifier": {"estimator": LogisticRegression()},
        "TunedThresholdClassifierCV": {"estimator": LogisticRegression(), "cv": 2},
        "SelfTrainingClassifier": {"estimator": clf},
        "StackingClassifier": {"estimators": [("t", clf), ("l", LogisticRegression())], "cv": 2},
        "StackingRegressor": {"estimators": [("t", reg), ("l", LinearRegression())], "cv": 2},
        "VotingClassifier": {"estimators": [("t", clf), ("l", LogisticRegression())]},
        "VotingRegressor": {"estimators": [("t", reg), ("l", LinearRegression())]},
        "GridSearchCV": {"estimator": clf, "param_grid": {"max_depth": [1, 2]}, "cv": 2},
        "RandomizedSearchCV": {"estimator": reg, "param_distributions": {"max_depth": [1, 2]}, "n_iter": 2,
                               "cv": 2, "random_state": 0},
        "CalibratedClassifierCV": {"cv": 2},
        "PLSRegression": {"n_components": 1},
        "CCA": {"n_components": 1},
        "PLSCanonical": {"n_components": 1},
        "KNeighborsClassifier": {"n_neighbors": 3},
        "KNeighborsRegressor": {"n_neighbors": 3},
        "RadiusNeighborsClassifier": {"radius": 10.0},
        "RadiusNeighborsRegressor": {"radius": 10.0},
    }
    return table.get(name, {})


def _estimators() -> list[tuple[str, type, str]]:
    from sklearn.utils import all_estimators

    found = [(n, c, "c") for n, c in all_estimators(type_filter="classifier")]
    found += [(n, c, "r") for n, c in all_estimators(type_filter="regressor")]
    return sorted(found, key=lambda t: t[0])


def test_skipped_estimators_exist() -> None:
    names = {n for n, _, _ in _estimators()}
    assert set(SKIPPED) <= names, sorted(set(SKIPPED) - names)


@pytest.mark.parametrize(("name", "cls", "kind"), [pytest.param(*t, id=t[0]) for t in _estimators()])
def test_estimator_packs_as_it_is_and_predicts(name: str, cls: type, kind: str, tmp_path: Path) -> None:
    import skops.io as sio

    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(40, 4)).astype(np.float32)  # small counts: fit NB and chi2 models too
    # Regression targets stay positive for the Gamma/Poisson/Tweedie models.
    y = (x[:, 0] + x[:, 1] > 3).astype(np.int64) if kind == "c" else (1 + x[:, 0] + 0.5 * x[:, 1]).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations, convergence and tiny-data warnings of the fit
        est = cls(**_params(name))
        est.fit(x, y)
        want = est.predict(x[:5])
    path = tmp_path / "model.skops"
    sio.dump(est, path)
    store = Store(tmp_path / "home")
    with warnings.catch_warnings():
        # sklearn's own notices: small samples, and classes it deprecates (warned when built again)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        rec = pack(path, name.lower(), store, sample=x[:5])
        assert rec.manifest.trust == () and not rec.manifest.allow_pickle
        model = adapter.load(store.open(rec.ref))
        model.load()
        got = model.predict({"input-0": x[:5]})["output-0"]
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=1e-5, atol=1e-6)
