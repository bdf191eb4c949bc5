"""The types modelpod trusts in skops files beyond skops' own defaults, and the checks that go with them.

skops rebuilds every type below from arrays and plain values (``__new__`` plus ``__setstate__``,
a fixed constructor, a function looked up by name, ``np.load(allow_pickle=False)``); none of them
runs pickle. What skops cannot check is the *content*: a tree's node indices are used by
scikit-learn's compiled code without bounds checks, so a crafted file could make ``predict`` read
out of bounds. Those types are trusted only together with a check of every loaded instance
(``check_loaded``), run before the model answers anything. The list is pinned by a test that
packs an estimator holding each type and loads it with pickle made to fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from modelpod.errors import UnsafeModelError

_TREE = "sklearn.tree._tree.Tree"
_HGB_TREE = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"

# type name -> why it is safe to rebuild (what skops does with it).
VETTED: dict[str, str] = {
    _TREE: "decision trees and their forests/boosting: Tree(n_features, n_classes, n_outputs) and "
           "its node/value arrays; node indices checked at load",
    _HGB_TREE: "histogram gradient boosting: a node record array; indices checked at load",
    "sklearn.neighbors._kd_tree.KDTree": "nearest neighbours: data/index/node arrays; checked at load",
    "sklearn.neighbors._ball_tree.BallTree": "nearest neighbours: data/index/node arrays; checked at load",
    "sklearn.metrics._dist_metrics.EuclideanDistance64": "distance metric without parameters",
    "sklearn.metrics._dist_metrics.ManhattanDistance64": "distance metric without parameters",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64": "distance metric without parameters",
    "sklearn._loss.loss.HalfTweedieLossIdentity": "a loss object holding its power",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer": "optimizer state: arrays and floats",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer": "optimizer state: arrays and floats",
    "sklearn.utils._bunch.Bunch": "a dict with attribute access (named estimators of stacking/voting)",
    "sklearn.multiclass._ConstantPredictor": "the constant answer for a single-class column",
    "sklearn.metrics._scorer._Scorer": "a scorer: a metric function (by trusted name) and its sign",
    "sklearn.metrics._scorer._CurveScorer": "a threshold-curve scorer: a metric and its thresholds",
    "sklearn.utils._metadata_requests.MetadataRequest": "metadata routing requests: names and flags",
    "sklearn.utils._metadata_requests.MethodMetadataRequest": "metadata routing requests: names and flags",
    "sklearn.calibration._CalibratedClassifier": "a fitted estimator plus its calibrators",
    "sklearn.calibration._SigmoidCalibration": "two floats (a, b)",
    "sklearn.cluster._bisect_k_means._BisectingTree": "centres, indices and children as plain attributes",
    "sklearn.gaussian_process._gpc._BinaryGaussianProcessClassifierLaplace": "arrays and a kernel",
    "sklearn.gaussian_process.kernels.ConstantKernel": "a kernel's hyperparameters",
    "sklearn.gaussian_process.kernels.RBF": "a kernel's hyperparameters",
    "sklearn.gaussian_process.kernels.Product": "two kernels",
    "sklearn.gaussian_process.kernels.Sum": "two kernels",
    "sklearn.gaussian_process.kernels.WhiteKernel": "a kernel's hyperparameters",
    "scipy.interpolate._bsplines.BSpline": "knots, coefficients and degree; re-checked by its constructor at load",
    "scipy.sparse._csr.csr_matrix": "written with save_npz, read with load_npz (no pickle); indices checked at load",
    "functools.partial": "a partial of a function that must itself be trusted by name (skops' PartialNode)",
    "sklearn.utils.validation.check_array": "function reference (HistGradientBoosting's categorical preprocessor)",
    "numpy.dtype": "rebuilt from an empty array read with np.load(allow_pickle=False)",
    # Functions are looked up by name and never called by skops; these are what the estimators'
    # defaults (score_func, pooling_func, k-means step, array namespace) refer to.
    "numpy.mean": "function reference (FeatureAgglomeration pooling_func)",
    "scipy._lib.array_api_compat.numpy._aliases.asarray": "function reference (array namespace)",
    "sklearn.cluster._kmeans._kmeans_single_lloyd": "function reference (BisectingKMeans)",
    "sklearn.cluster._kmeans._kmeans_single_elkan": "function reference (BisectingKMeans)",
    "sklearn.feature_selection._univariate_selection.f_classif": "function reference (score_func)",
    "sklearn.feature_selection._univariate_selection.f_regression": "function reference (score_func)",
    "sklearn.feature_selection._univariate_selection.chi2": "function reference (score_func)",
    "sklearn.metrics._classification.balanced_accuracy_score": "function reference (TunedThresholdClassifierCV)",
}


def type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _objects(root: object) -> Iterator[tuple[object, object | None]]:
    """Every object reachable through attributes, containers and object arrays, with its holder."""
    seen: set[int] = set()
    stack: list[tuple[object, object | None]] = [(root, None)]
    while stack:
        obj, holder = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(obj))
        yield obj, holder
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                stack.extend((x, holder) for x in obj.ravel())
        elif isinstance(obj, dict):
            stack.extend((v, holder) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, holder) for v in obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend((v, obj) for v in vars(obj).values())


def _bad(what: str) -> UnsafeModelError:
    return UnsafeModelError(f"refused: {what} (a crafted or damaged file); it would make predict read out of bounds")


def _check_children(left: np.ndarray[Any, Any], right: np.ndarray[Any, Any], leaf: np.ndarray[Any, Any],
                    feature: np.ndarray[Any, Any], n_features: int, what: str) -> None:
    # Children are numbered after their parent by scikit-learn's builders, so "child > parent"
    # also rules out cycles; every internal node's feature must be a column of the input.
    n = len(left)
    idx = np.arange(n)
    inner = ~leaf
    if n == 0:
        raise _bad(f"{what} has no nodes")
    if np.any(inner & ((left <= idx) | (right <= idx) | (left >= n) | (right >= n))):
        raise _bad(f"{what} has a child index out of range")
    if np.any(inner & ((feature < 0) | (feature >= n_features))):
        raise _bad(f"{what} splits on a feature index out of range")


def _check_tree(tree: Any, holder: object | None) -> None:
    n_features = int(tree.n_features)
    left, right = np.asarray(tree.children_left), np.asarray(tree.children_right)
    leaf = (left == -1) & (right == -1)
    _check_children(left, right, leaf, np.asarray(tree.feature), n_features, "a decision tree")
    # The estimator checks the input's columns against n_features_in_, the tree does not.
    owned = getattr(holder, "n_features_in_", None)
    if owned is None or getattr(holder, "tree_", None) is not tree or int(owned) != n_features:
        raise _bad("a decision tree's feature count differs from its estimator's")


def _check_hgb(predictor: Any, holder: object | None) -> None:
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    nodes = predictor.nodes
    if not isinstance(nodes, np.ndarray) or nodes.dtype != PREDICTOR_RECORD_DTYPE or nodes.ndim != 1:
        raise _bad("a gradient boosting tree has a malformed node array")
    n_features = int(getattr(holder, "n_features_in_", 0) or 0)
    leaf = nodes["is_leaf"].astype(bool)
    left, right = nodes["left"].astype(np.int64), nodes["right"].astype(np.int64)
    _check_children(left, right, leaf, nodes["feature_idx"], n_features, "a gradient boosting tree")
    cat = ~leaf & nodes["is_categorical"].astype(bool)
    for name in ("raw_left_cat_bitsets", "binned_left_cat_bitsets"):
        bits = getattr(predictor, name)
        if not isinstance(bits, np.ndarray) or bits.ndim != 2 or bits.shape[1] != 8:
            raise _bad("a gradient boosting tree has malformed category bitsets")
        if np.any(cat & (nodes["bitset_idx"] >= len(bits))):
            raise _bad("a gradient boosting tree has a category bitset index out of range")
    mapper = getattr(holder, "_bin_mapper", None)
    is_cat = getattr(mapper, "is_categorical_", None)
    if np.any(cat) and (is_cat is None or not np.all(np.asarray(is_cat)[nodes["feature_idx"][cat]])):
        raise _bad("a gradient boosting tree splits by category on a numeric feature")


def _check_bin_mapper(mapper: Any, holder: object | None) -> None:
    is_cat = getattr(mapper, "is_categorical_", None)
    if is_cat is None:
        return
    is_cat = np.asarray(is_cat)
    n_features = getattr(holder, "n_features_in_", None)
    if n_features is not None and is_cat.shape != (int(n_features),):
        raise _bad("histogram gradient boosting's category mask does not match its features")
    for f in np.flatnonzero(is_cat):
        cats = np.asarray(mapper.bin_thresholds_[f])
        if cats.size and (cats.min() < 0 or cats.max() > 255):
            raise _bad("histogram gradient boosting knows a category outside 0..255")


def _check_binary_tree(tree: Any, holder: object | None) -> None:
    state = tree.__getstate__()
    data, idx, node_data, bounds = (np.asarray(a) for a in state[:4])
    n_levels, n_nodes = int(state[5]), int(state[6])
    if data.ndim != 2 or idx.shape != (len(data),):
        raise _bad("a neighbours tree has malformed data or index arrays")
    if not np.array_equal(np.sort(idx), np.arange(len(data))):
        raise _bad("a neighbours tree's index array is not a permutation of its rows")
    if n_levels < 1 or n_levels > 64 or n_nodes != 2**n_levels - 1 or node_data.shape != (n_nodes,):
        raise _bad("a neighbours tree's node count does not match its depth")
    start, end = node_data["idx_start"], node_data["idx_end"]
    if np.any((start < 0) | (end > len(data)) | (start > end)):
        raise _bad("a neighbours tree has a node range out of bounds")
    if bounds.ndim != 3 or bounds.shape[1:] != (n_nodes, data.shape[1]):
        raise _bad("a neighbours tree's node bounds do not match its nodes")
    weights = state[12]
    if weights is not None and np.asarray(weights).shape != (len(data),):
        raise _bad("a neighbours tree's sample weights do not match its rows")


def _check_bspline(spline: Any, holder: object | None) -> None:
    try:  # BSpline's constructor checks knots, degree and coefficients against each other
        type(spline)(spline.t, spline.c, spline.k, extrapolate=spline.extrapolate, axis=spline.axis)
    except (ValueError, TypeError, AttributeError) as exc:
        raise _bad(f"a spline is inconsistent ({exc})") from None


def _check_sparse(matrix: Any, holder: object | None) -> None:
    try:
        matrix.check_format(full_check=True)
    except (ValueError, TypeError) as exc:
        raise _bad(f"a sparse matrix has invalid indices ({exc})") from None


_CHECKS: dict[str, Callable[[Any, object | None], None]] = {
    _TREE: _check_tree,
    _HGB_TREE: _check_hgb,
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper": _check_bin_mapper,
    "sklearn.neighbors._kd_tree.KDTree": _check_binary_tree,
    "sklearn.neighbors._ball_tree.BallTree": _check_binary_tree,
    "scipy.interpolate._bsplines.BSpline": _check_bspline,
    "scipy.sparse._csr.csr_matrix": _check_sparse,
}


def check_loaded(estimator: object) -> None:
    """Check the content of every instance of a type that needs it; UnsafeModelError if any is off."""
    for obj, holder in _objects(estimator):
        check = _CHECKS.get(type_name(obj))
        if check is not None:
            try:
                check(obj, holder)
            except UnsafeModelError:
                raise
            except Exception as exc:  # a malformed object breaks the check itself: refuse it too
                raise _bad(f"{type_name(obj)} cannot be checked ({type(exc).__name__}: {exc})") from None
        if type_name(obj).startswith("sklearn.ensemble") and hasattr(obj, "estimators_"):
            _check_members(obj)


def _check_members(ensemble: Any) -> None:
    """Sub-estimators of an ensemble see the ensemble's columns (or the subset it records)."""
    n_features = getattr(ensemble, "n_features_in_", None)
    found = ensemble.estimators_
    found = found.ravel().tolist() if isinstance(found, np.ndarray) else list(found)
    members = [m for m in found if hasattr(m, "tree_")]
    if not members:
        return
    if n_features is None:
        raise _bad("an ensemble of trees does not record its number of features")
    subsets = getattr(ensemble, "estimators_features_", None)
    if subsets is None:
        if any(int(m.tree_.n_features) != int(n_features) for m in members):
            raise _bad("a tree of an ensemble reads more columns than the ensemble has")
        return
    if len(subsets) != len(members):
        raise _bad("an ensemble's feature subsets do not match its trees")
    for m, cols in zip(members, subsets, strict=True):
        cols = np.asarray(cols)
        if cols.ndim != 1 or np.any((cols < 0) | (cols >= int(n_features))) or len(cols) != int(m.tree_.n_features):
            raise _bad("an ensemble's feature subset is out of range")
