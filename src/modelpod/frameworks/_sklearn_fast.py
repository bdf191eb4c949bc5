"""Linear scikit-learn estimators answered with one matrix product, proven equal to sklearn's at load.

A linear model's ``predict`` on a few rows is almost all input validation: scikit-learn 1.9 makes
about 600 Python calls per call (dataframe detection, array-API namespaces, finiteness), some
200 µs, around a product that takes 2 µs. For the estimators whose ``predict`` and
``decision_function`` are scikit-learn's own linear ones (``LinearClassifierMixin``: logistic
regression, linear SVC, SGD, perceptron...; ``LinearModel``: linear regression, lasso, elastic net,
Huber, linear SVR...), ``fast_method`` returns a function computing the same expression on the
same array (``X @ coef_.T + intercept_``, then the sign or the argmax into ``classes_``).

It is used only where it is proven: at load it must give bit for bit the estimator's own answer
(values, dtype and shape) on random batches of the signature's dtype and several sizes; if one
differs, or raises, the estimator answers as before. At predict time anything outside what was
proven goes to the estimator too, so its own checks and errors stay: input that is not a plain
C-ordered numeric ndarray of the proven dtype, a feature count other than the fitted one, no
rows, and any NaN or infinity (sklearn refuses them with its own message, or handles them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
Method = Callable[[Any], Any]

# Batch sizes the fast path is proven on (BLAS picks its kernel by shape: one row is a gemv).
PROOF_ROWS = (1, 2, 3, 8, 31, 64)


def _kind(estimator: Any) -> str:
    """"classifier", "regressor", or "" when the estimator's methods are not sklearn's linear ones."""
    try:
        from sklearn.linear_model._base import LinearClassifierMixin, LinearModel, MultiOutputLinearModel
    except ImportError:  # another scikit-learn layout: no fast path
        return ""
    cls = type(estimator)
    if (getattr(cls, "predict", None) is LinearClassifierMixin.predict
            and getattr(cls, "decision_function", None) is LinearClassifierMixin.decision_function):
        return "classifier"
    if (getattr(cls, "predict", None) in (LinearModel.predict, MultiOutputLinearModel.predict)
            and getattr(cls, "_decision_function", None) is LinearModel._decision_function):
        return "regressor"
    return ""


def _parameters(estimator: Any) -> tuple[Array, Any, int] | None:
    """(coef_ as used in the product, intercept_, n_features_in_), or None when not plain arrays."""
    coef = getattr(estimator, "coef_", None)
    intercept = getattr(estimator, "intercept_", None)
    features = getattr(estimator, "n_features_in_", None)
    if type(coef) is not np.ndarray or coef.ndim not in (1, 2) or not isinstance(features, int):
        return None  # sparse (sparsify()) or missing coefficients
    if not (type(intercept) is np.ndarray or isinstance(intercept, (float, int))):
        return None
    return (coef.T if coef.ndim == 2 else coef), intercept, features


def fast_method(estimator: Any, name: str, dtype: np.dtype[Any] | None) -> Method | None:
    """A proven fast ``estimator.<name>`` (``predict`` or ``decision_function``), or None."""
    if dtype is None or dtype.kind not in "fiu" or name not in ("predict", "decision_function"):
        return None
    kind = _kind(estimator)
    params = _parameters(estimator) if kind else None
    if params is None or (kind == "regressor" and name != "predict"):
        return None
    coef_t, intercept, features = params
    own: Method = getattr(estimator, name)
    classes = getattr(estimator, "classes_", None)
    if kind == "classifier" and name == "predict" and (type(classes) is not np.ndarray or len(classes) == 0
                                                       or classes.dtype.kind == "O"):
        return None  # object labels (strings): sklearn's own path hands them back as they are
    finite_check = dtype.kind == "f"

    def scores(x: Array) -> Array:
        out: Array = x @ coef_t + intercept
        if kind == "classifier" and out.ndim > 1 and out.shape[1] == 1:
            out = out.reshape(-1)
        return out

    def label(x: Array) -> Array:
        s = scores(x)
        indices = (s > 0).astype(np.intp) if s.ndim == 1 else s.argmax(axis=1)
        assert classes is not None
        labels: Array = classes.take(indices, axis=0)
        return labels

    compute = label if (kind == "classifier" and name == "predict") else scores

    def fast(x: Any) -> Any:
        if (type(x) is not np.ndarray or x.dtype != dtype or x.ndim != 2 or x.shape[1] != features
                or not x.shape[0] or not x.flags.c_contiguous
                or (finite_check and not np.isfinite(x).all())):
            return own(x)  # sklearn's own checks, errors and handling
        return compute(x)

    return fast if _proven(own, compute, features, dtype) else None


def _proven(own: Method, compute: Callable[[Array], Array], features: int, dtype: np.dtype[Any]) -> bool:
    """Whether ``compute`` gives exactly the estimator's answers on random batches of ``dtype``."""
    rng = np.random.default_rng(20261202)
    for rows in PROOF_ROWS:
        if dtype.kind == "f":
            x = (rng.standard_normal((rows, features)) * rng.choice((0.01, 1.0, 100.0))).astype(dtype)
        else:
            info = np.iinfo(dtype)
            x = rng.integers(max(int(info.min), -1000), min(int(info.max), 1000), (rows, features),
                             endpoint=True).astype(dtype)
        try:
            want = np.asarray(own(x))
            got = np.asarray(compute(x))
        except Exception:
            return False
        if want.dtype != got.dtype or want.shape != got.shape:
            return False
        if want.dtype.kind == "f":
            a, b = (np.ascontiguousarray(v).view(np.uint8) for v in (want, got))
            if not np.array_equal(a, b):  # bit for bit (NaN, the sign of zero)
                return False
        elif not np.array_equal(want, got):
            return False
    return True
