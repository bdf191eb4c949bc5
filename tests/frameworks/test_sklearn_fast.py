"""The linear fast path (frameworks/_sklearn_fast.py) answers exactly as scikit-learn, or not at all.

Every linear classifier and regressor of scikit-learn is fitted on small random data (binary and
multi-class, string and integer labels, with and without intercept, float32/float64/int64 inputs)
and compared with its own ``predict``/``decision_function`` bit for bit on fresh random batches;
inputs outside what was proven go to scikit-learn (its errors on NaN and on the wrong feature count).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelpod.frameworks._sklearn_fast import fast_method
from modelpod.frameworks.sklearn import SklearnModel
from modelpod.packing import pack
from modelpod.store import Store

sklearn = pytest.importorskip("sklearn")
from sklearn import linear_model, svm  # noqa: E402

CLASSIFIERS = [linear_model.LogisticRegression, linear_model.SGDClassifier, linear_model.Perceptron,
               linear_model.PassiveAggressiveClassifier, svm.LinearSVC]
REGRESSORS = [linear_model.LinearRegression, linear_model.LassoLars, linear_model.QuantileRegressor,
              linear_model.HuberRegressor, svm.LinearSVR, linear_model.Lars]


def bits_equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)))
    return bool(np.array_equal(a, b))


def fitted(cls: type, classes: int, labels: str, rng: np.random.Generator, features: int,
           **params: Any) -> Any:
    x = rng.standard_normal((120, features))
    if classes:
        y_int = rng.integers(0, classes, 120)
        y: Any = np.array([f"class-{v}" for v in y_int]) if labels == "str" else y_int * 7 - 3
    else:
        y = x @ rng.standard_normal(features) + rng.standard_normal(120) * 0.1
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**params).fit(x, y)


@pytest.mark.parametrize("cls", CLASSIFIERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_linear_classifiers_answer_bit_for_bit(cls: type, classes: int, dtype: str) -> None:
    rng = np.random.default_rng(abs(hash((cls.__name__, classes, dtype))) % 2**32)
    est = fitted(cls, classes, "int", rng, 7)
    dt = np.dtype(dtype)
    for name in ("predict", "decision_function"):
        fast = fast_method(est, name, dt)
        assert fast is not None, (cls.__name__, name)
        own = getattr(est, name)
        for rows in (1, 5, 17, 100, 257):
            x = (rng.standard_normal((rows, 7)) * rng.choice([0.1, 3.0, 1e3])).astype(dt) if dt.kind == "f" \
                else rng.integers(-50, 50, (rows, 7)).astype(dt)
            assert bits_equal(fast(x), own(x)), (cls.__name__, name, rows)


@pytest.mark.parametrize("cls", REGRESSORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("intercept", [True, False])
def test_linear_regressors_answer_bit_for_bit(cls: type, intercept: bool) -> None:
    rng = np.random.default_rng(len(cls.__name__) * 31 + intercept)
    est = fitted(cls, 0, "", rng, 5, fit_intercept=intercept)
    for dt in (np.dtype("float32"), np.dtype("float64")):
        fast = fast_method(est, "predict", dt)
        assert fast is not None, cls.__name__
        for rows in (1, 3, 64, 300):
            x = rng.standard_normal((rows, 5)).astype(dt)
            assert bits_equal(fast(x), est.predict(x)), (cls.__name__, rows)


def test_what_is_not_plainly_linear_keeps_sklearns_path() -> None:
    rng = np.random.default_rng(3)
    est = fitted(linear_model.LogisticRegression, 3, "str", rng, 4)
    fast = fast_method(est, "predict", np.dtype("float32"))  # string labels: the same take
    x = rng.standard_normal((30, 4)).astype(np.float32)
    assert fast is not None and bits_equal(fast(x), est.predict(x)) and fast(x).dtype.kind == "U"
    est.classes_ = est.classes_.astype(object)  # object labels: sklearn's own path
    assert fast_method(est, "predict", np.dtype("float32")) is None
    assert fast_method(est, "decision_function", np.dtype("float32")) is not None
    assert fast_method(est, "predict_proba", np.dtype("float32")) is None
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier(max_depth=2).fit(rng.standard_normal((40, 4)), rng.integers(0, 2, 40))
    assert fast_method(tree, "predict", np.dtype("float32")) is None
    ridge = linear_model.Ridge().fit(rng.standard_normal((40, 4)), rng.standard_normal(40))
    sparse = fitted(linear_model.SGDClassifier, 2, "int", rng, 4).sparsify()
    assert fast_method(sparse, "predict", np.dtype("float64")) is None
    assert fast_method(ridge, "predict", np.dtype("bool")) is None


def test_inputs_outside_the_proof_get_sklearns_own_answer_or_error() -> None:
    rng = np.random.default_rng(4)
    est = fitted(linear_model.LogisticRegression, 2, "int", rng, 6)
    fast = fast_method(est, "predict", np.dtype("float32"))
    assert fast is not None
    x = rng.standard_normal((4, 6)).astype(np.float32)
    for bad in (np.where(np.arange(24).reshape(4, 6) == 5, np.nan, x).astype(np.float32),
                np.where(np.arange(24).reshape(4, 6) == 7, np.inf, x).astype(np.float32)):
        with pytest.raises(ValueError) as fast_error:
            fast(bad)
        with pytest.raises(ValueError) as own_error:
            est.predict(bad)
        assert str(fast_error.value) == str(own_error.value)
    with pytest.raises(ValueError, match="features"):
        fast(rng.standard_normal((2, 5)).astype(np.float32))
    wide = rng.standard_normal((4, 12)).astype(np.float32)[:, ::2]  # not C-ordered, float64, a list
    assert bits_equal(fast(wide), est.predict(wide))
    assert bits_equal(fast(x.astype(np.float64)), est.predict(x.astype(np.float64)))
    assert bits_equal(fast(x.tolist()), est.predict(x.tolist()))


def test_a_packed_linear_pod_predicts_through_the_fast_path(tmp_path: Any) -> None:
    import skops.io

    rng = np.random.default_rng(5)
    est = fitted(linear_model.LogisticRegression, 3, "int", rng, 8)
    skops.io.dump(est, tmp_path / "lr.skops")
    sample = rng.standard_normal((4, 8)).astype(np.float32)
    store = Store(tmp_path / "home")
    pack(tmp_path / "lr.skops", "lr", store, sample=sample)
    model = SklearnModel(store.open("lr"))
    model.load()
    assert model.method.__qualname__.startswith("fast_method")
    for rows in (1, 9, 40):
        x = rng.standard_normal((rows, 8)).astype(np.float32)
        assert bits_equal(model.predict({"input-0": x})["output-0"], est.predict(x))
