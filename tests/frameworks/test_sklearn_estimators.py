"""Every classifier and regressor in scikit-learn's ``all_estimators()`` packs as it is and predicts.

Tiny synthetic data, one estimator at a time, nothing in parallel. Meta-estimators get a small
base estimator; multi-output ones a 2-D target, IsotonicRegression its single feature. Anything
that cannot take such data would be listed in SKIPPED with its reason (none is, today).
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

# name -> why it cannot be packed from a small numeric table here.
SKIPPED: dict[str, str] = {}
# Estimators that need a 2-D target (several outputs or labels).
MULTI_OUTPUT = {"MultiTaskElasticNet", "MultiTaskElasticNetCV", "MultiTaskLasso", "MultiTaskLassoCV",
                "ClassifierChain", "RegressorChain", "MultiOutputClassifier", "MultiOutputRegressor"}
ONE_FEATURE = {"IsotonicRegression"}


def _params(name: str) -> dict[str, Any]:
    """Constructor arguments for estimators that need some (meta-estimators: a small base)."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    clf, reg = DecisionTreeClassifier(max_depth=2), DecisionTreeRegressor(max_depth=2)
    table: dict[str, dict[str, Any]] = {
        "ClassifierChain": {"estimator": LogisticRegression()},
        "RegressorChain": {"estimator": LinearRegression()},
        "MultiOutputClassifier": {"estimator": clf},
        "MultiOutputRegressor": {"estimator": reg},
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


def test_special_cases_exist() -> None:
    names = {n for n, _, _ in _estimators()}
    special = set(SKIPPED) | MULTI_OUTPUT | ONE_FEATURE
    assert special <= names, sorted(special - names)


@pytest.mark.parametrize(("name", "cls", "kind"), [pytest.param(*t, id=t[0]) for t in _estimators()])
def test_estimator_packs_as_it_is_and_predicts(name: str, cls: type, kind: str, tmp_path: Path) -> None:
    import skops.io as sio

    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(40, 4)).astype(np.float32)  # small counts: fit NB and chi2 models too
    # Regression targets stay positive for the Gamma/Poisson/Tweedie models.
    y = (x[:, 0] + x[:, 1] > 3).astype(np.int64) if kind == "c" else (1 + x[:, 0] + 0.5 * x[:, 1]).astype(np.float64)
    if name in MULTI_OUTPUT:
        y = np.c_[y, (x[:, 2] > 1).astype(np.int64) if kind == "c" else 1 + x[:, 2]]
    if name in ONE_FEATURE:
        x = x[:, :1]
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
