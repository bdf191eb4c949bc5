"""skops files: the types modelpod trusts beyond skops' defaults, ``--trust``, and the load-time checks.

Every vetted type is packed inside an estimator that holds it and loaded with pickle made to fail
and an audit hook watching for ``pickle.find_class``: skops must rebuild it from arrays alone.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fwutil import assert_store_empty

from modelpod.cli import main
from modelpod.errors import UnsafeModelError, UsageError
from modelpod.frameworks import sklearn as adapter
from modelpod.frameworks._skops_trust import VETTED, check_loaded
from modelpod.packing import pack
from modelpod.pod import Pod, write_manifest
from modelpod.store import Store

pytest.importorskip("skops")

# How skops rebuilds a node; none of these runs pickle (ReduceNode-style loaders use a fixed
# constructor, ObjectNode uses __new__ + __setstate__, the array nodes np.load(allow_pickle=False)).
PICKLE_FREE_LOADERS = {"ObjectNode", "DictNode", "PartialNode", "TreeNode", "DTypeNode", "FunctionNode",
                       "SparseMatrixNode", "ConstructorFromReduceNode"}

_PICKLE_EVENTS: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _PICKLE_EVENTS is not None and event == "pickle.find_class":
        _PICKLE_EVENTS.append(f"{args[0]}.{args[1]}")


sys.addaudithook(_audit)  # records only inside no_pickle() below


class _NoPickle:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle was used")


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """While active, pickle's entry points raise, and any global an unpickler resolves is recorded."""
    global _PICKLE_EVENTS
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, _NoPickle)
    _PICKLE_EVENTS = []
    try:
        yield _PICKLE_EVENTS
    finally:
        _PICKLE_EVENTS = None


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(40, 4))).astype(np.float32)
    return x, (x[:, 0] > np.median(x[:, 0])).astype(np.int64), (x[:, 0] + x[:, 1]).astype(np.float64)


def _fit(est: Any, y: str) -> Any:
    x, yc, yr = _data()
    target = {"c": yc, "r": yr, "multilabel": np.c_[yc, np.zeros_like(yc)], "cat": yc}[y]
    if y == "cat":  # column 3 as small category codes
        x = np.c_[x[:, :3], np.floor(x[:, 3] * 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(x, target)


def _holder(type_name: str) -> tuple[Any, str]:
    """An estimator that holds ``type_name`` once fitted, and the method that uses it."""
    from sklearn import (
        calibration,
        cluster,
        ensemble,
        feature_selection,
        gaussian_process,
        linear_model,
        manifold,
        model_selection,
        multiclass,
        neighbors,
        neural_network,
        preprocessing,
        tree,
    )
    from sklearn.gaussian_process import kernels
    from sklearn.pipeline import make_pipeline

    gpr = (gaussian_process.GaussianProcessRegressor(kernel=kernels.ConstantKernel() * kernels.RBF()
                                                     + kernels.WhiteKernel()), "r", "predict")
    tuned = (model_selection.TunedThresholdClassifierCV(linear_model.LogisticRegression(), cv=2), "c", "predict")
    categorical = (ensemble.HistGradientBoostingClassifier(max_iter=5, categorical_features=[3]), "cat", "predict")
    table: dict[str, tuple[Any, str, str]] = {
        "functools.partial": categorical,
        "sklearn.utils.validation.check_array": categorical,
        "sklearn.utils._bunch.Bunch": (ensemble.VotingClassifier(
            [("t", tree.DecisionTreeClassifier(max_depth=2)), ("l", linear_model.LogisticRegression())]),
            "c", "predict"),
        "sklearn.multiclass._ConstantPredictor":
            (multiclass.OneVsRestClassifier(linear_model.LogisticRegression()), "multilabel", "predict"),
        "sklearn.metrics._scorer._Scorer": tuned,
        "sklearn.metrics._scorer._CurveScorer": tuned,
        "sklearn.utils._metadata_requests.MetadataRequest": tuned,
        "sklearn.utils._metadata_requests.MethodMetadataRequest": tuned,
        "sklearn.metrics._classification.balanced_accuracy_score": tuned,
        "sklearn.tree._tree.Tree": (tree.DecisionTreeClassifier(max_depth=3), "c", "predict"),
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor":
            (ensemble.HistGradientBoostingRegressor(max_iter=5), "r", "predict"),
        "sklearn.neighbors._kd_tree.KDTree": (neighbors.KNeighborsClassifier(3), "c", "predict_proba"),
        "sklearn.neighbors._ball_tree.BallTree":
            (neighbors.KNeighborsRegressor(3, algorithm="ball_tree"), "r", "predict"),
        "sklearn.metrics._dist_metrics.EuclideanDistance64": (neighbors.KNeighborsRegressor(3), "r", "predict"),
        "sklearn.metrics._dist_metrics.ManhattanDistance64":
            (neighbors.KNeighborsRegressor(3, metric="manhattan"), "r", "predict"),
        "sklearn.metrics._dist_metrics.ChebyshevDistance64":
            (neighbors.KNeighborsRegressor(3, metric="chebyshev"), "r", "predict"),
        "sklearn._loss.loss.HalfTweedieLossIdentity": (linear_model.TweedieRegressor(), "r", "predict"),
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer":
            (neural_network.MLPClassifier(hidden_layer_sizes=(4,), max_iter=20, random_state=0), "c", "predict_proba"),
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer":
            (neural_network.MLPRegressor(hidden_layer_sizes=(4,), solver="sgd", max_iter=20, random_state=0),
             "r", "predict"),
        "sklearn.calibration._CalibratedClassifier": (calibration.CalibratedClassifierCV(cv=2), "c", "predict_proba"),
        "sklearn.calibration._SigmoidCalibration": (calibration.CalibratedClassifierCV(cv=2), "c", "predict_proba"),
        "sklearn.cluster._bisect_k_means._BisectingTree":
            (cluster.BisectingKMeans(3, random_state=0), "c", "predict"),
        "sklearn.cluster._kmeans._kmeans_single_lloyd": (cluster.BisectingKMeans(3, random_state=0), "c", "predict"),
        "sklearn.cluster._kmeans._kmeans_single_elkan":
            (cluster.BisectingKMeans(3, algorithm="elkan", random_state=0), "c", "predict"),
        "sklearn.gaussian_process._gpc._BinaryGaussianProcessClassifierLaplace":
            (gaussian_process.GaussianProcessClassifier(), "c", "predict_proba"),
        "sklearn.gaussian_process.kernels.ConstantKernel": gpr,
        "sklearn.gaussian_process.kernels.RBF": gpr,
        "sklearn.gaussian_process.kernels.Product": gpr,
        "sklearn.gaussian_process.kernels.Sum": gpr,
        "sklearn.gaussian_process.kernels.WhiteKernel": gpr,
        "scipy.interpolate._bsplines.BSpline": (preprocessing.SplineTransformer(), "r", "transform"),
        "scipy._lib.array_api_compat.numpy._aliases.asarray": (preprocessing.SplineTransformer(), "r", "transform"),
        "scipy.sparse._csr.csr_matrix": (manifold.SpectralEmbedding(n_components=2), "r", "embedding"),
        "numpy.dtype": (preprocessing.KBinsDiscretizer(n_bins=3, quantile_method="linear"), "r", "transform"),
        "numpy.mean": (cluster.FeatureAgglomeration(2), "r", "transform"),
        "sklearn.feature_selection._univariate_selection.f_classif":
            (make_pipeline(feature_selection.SelectKBest(k=2), linear_model.LogisticRegression()), "c", "predict"),
        "sklearn.feature_selection._univariate_selection.f_regression":
            (feature_selection.SelectKBest(feature_selection.f_regression, k=2), "r", "transform"),
        "sklearn.feature_selection._univariate_selection.chi2":
            (feature_selection.SelectKBest(feature_selection.chi2, k=2), "c", "transform"),
    }
    est, y, method = table[type_name]
    return _fit(est, y), method


def _loaders(blob: bytes, type_name: str) -> set[str]:
    """How skops' schema says it rebuilds each node of ``type_name``."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        schema = json.loads(zf.read("schema.json"))
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if f"{node.get('__module__')}.{node.get('__class__')}" == type_name:
                found.add(str(node.get("__loader__")))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _use(est: Any, method: str) -> np.ndarray:
    if method == "embedding":
        return np.asarray(est.affinity_matrix_.toarray())
    x = _data()[0]
    if getattr(est, "categorical_features", None) is not None:
        x = np.c_[x[:, :3], np.floor(x[:, 3] * 2)]
    out = getattr(est, method)(x)
    return np.asarray(out.toarray() if hasattr(out, "toarray") else out)


@pytest.mark.parametrize("type_name", sorted(VETTED))
def test_vetted_type_is_rebuilt_from_arrays_without_pickle(type_name: str, no_pickle: list[str]) -> None:
    import skops.io as sio

    est, method = _holder(type_name)
    blob = sio.dumps(est)
    # On the list only because skops does not trust it by default, and skops rebuilds it
    # through one of its pickle-free loaders.
    assert type_name in sio.get_untrusted_types(data=blob)
    loaders = _loaders(blob, type_name)
    assert loaders and loaders <= PICKLE_FREE_LOADERS, loaders
    again = sio.loads(blob, trusted=sorted(VETTED))
    check_loaded(again)
    assert no_pickle == []
    np.testing.assert_allclose(_use(again, method), _use(est, method))


def _skops(tmp_path: Path, est: Any, name: str = "model.skops") -> Path:
    import skops.io as sio

    path = tmp_path / name
    sio.dump(est, path)
    return path


def test_common_tree_models_pack_without_any_flag(tmp_path: Path, store: Store, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    from sklearn.ensemble import GradientBoostingClassifier, IsolationForest, RandomForestRegressor

    x = _data()[0]
    np.save(tmp_path / "x.npy", x[:4])
    for name, est, y in (("gb", GradientBoostingClassifier(n_estimators=5), "c"),
                         ("rf", RandomForestRegressor(n_estimators=5), "r"),
                         ("iso", IsolationForest(n_estimators=5, random_state=0), "r")):
        model = _skops(tmp_path, _fit(est, y), f"{name}.skops")
        code = main(["--home", str(store.home), "pack", str(model), "--name", name, "--sample",
                     str(tmp_path / "x.npy"), "--json"])
        assert code == 0, capsys.readouterr().err
        rec = store.get(name)
        assert rec.manifest.trust == () and not rec.manifest.allow_pickle
        loaded = adapter.load(store.open(rec.ref))
        loaded.load()
        np.testing.assert_allclose(loaded.predict({"input-0": x})["output-0"], est.predict(x))


def _mutual_info_model(tmp_path: Path) -> tuple[Path, str]:
    from sklearn.feature_selection import SelectKBest, mutual_info_classif
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    est = _fit(make_pipeline(SelectKBest(mutual_info_classif, k=2), LogisticRegression()), "c")
    return _skops(tmp_path, est), "sklearn.feature_selection._mutual_info.mutual_info_classif"


def test_other_types_need_the_exact_narrow_trust(tmp_path: Path, store: Store,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path, needed = _mutual_info_model(tmp_path)
    x = _data()[0][:3]
    np.save(tmp_path / "x.npy", x)
    base = ["--home", str(store.home), "pack", str(path), "--name", "mi", "--sample", str(tmp_path / "x.npy")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--trust {needed}" in err and "--allow-pickle" not in err
    # --allow-pickle is for pickle files: it does not widen what a skops file may hold.
    assert main([*base, "--allow-pickle"]) == 2 and f"--trust {needed}" in capsys.readouterr().err
    assert_store_empty(store)
    # A type the file does not hold is not trusted "just in case".
    assert main([*base, "--trust", f"{needed},builtins.eval"]) == 2
    assert "builtins.eval" in capsys.readouterr().err
    assert main([*base, "--trust", needed, "--json"]) == 0
    rec = store.get("mi")
    assert rec.manifest.trust == (needed,) and rec.manifest.to_dict()["security"]["trust"] == [needed]
    assert main(["--home", str(store.home), "predict", "mi", "--input", str(tmp_path / "x.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["outputs"][0]["shape"] == [3]


def test_trust_is_honoured_at_load_only_as_recorded(tmp_path: Path, store: Store) -> None:
    path, needed = _mutual_info_model(tmp_path)
    rec = pack(path, "mi", store, sample=_data()[0][:3], trust=[needed])
    crafted = tmp_path / "crafted"
    shutil.copytree(store.open(rec.ref).path, crafted)
    # The old spelling in options (or anything else a hand-made manifest puts there) is not trust.
    write_manifest(crafted, replace(rec.manifest, trust=(), options={**rec.manifest.options,
                                                                      "trusted_types": [needed]}))
    with pytest.raises(UnsafeModelError, match=rf"model\.skops.*--trust {needed}"):
        adapter.load(Pod.open(crafted)).load()
    write_manifest(crafted, rec.manifest)
    model = adapter.load(Pod.open(crafted))
    model.load()
    assert model.predict({"input-0": _data()[0][:2]})["output-0"].shape == (2,)


def test_trust_is_for_skops_files_only(tmp_path: Path, store: Store) -> None:
    from sklearn.linear_model import LogisticRegression

    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps(_fit(LogisticRegression(), "c")))
    with pytest.raises(UsageError, match="--allow-pickle"):
        pack(pkl, "lr", store, sample=_data()[0][:2], trust="sklearn.tree._tree.Tree")
    with pytest.raises(UsageError, match="full type names"):
        pack(_skops(tmp_path, _fit(LogisticRegression(), "c")), "lr", store, sample=_data()[0][:2], trust="Tree")
    assert_store_empty(store)


# -- crafted files: trusted types whose content would make predict read out of bounds ------------
def _crafted(tmp_path: Path, est: Any, damage: Callable[[Any], None]) -> Path:
    damage(est)
    return _skops(tmp_path, est)


def _tree_child(est: Any) -> None:
    from sklearn.tree._tree import Tree

    tree = est.tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = 10**6
    again = Tree(tree.n_features, np.asarray(tree.n_classes), tree.n_outputs)
    again.__setstate__({**state, "nodes": nodes})
    est.tree_ = again


def _tree_feature(est: Any) -> None:
    est.estimators_[0].tree_.feature[0] = 99  # the node array is writable through the property view


def _hgb_feature(est: Any) -> None:
    est._predictors[0][0].nodes["feature_idx"][0] = 10**6


def _hgb_category(est: Any) -> None:
    nodes = est._predictors[0][0].nodes
    inner = int(np.flatnonzero(nodes["is_leaf"] == 0)[0])
    nodes["is_categorical"][inner] = 1  # a categorical split on a numeric column: no bitset for it


def _spline_degree(est: Any) -> None:
    est.bsplines_[0].k = 40  # more than its knots allow: evaluation would index past them


def _kd_index(est: Any) -> None:
    from sklearn.neighbors import KDTree

    state = list(est._tree.__getstate__())
    state[1] = state[1].copy()
    state[1][0] = 10**6
    tree = KDTree.__new__(KDTree)
    tree.__setstate__(tuple(state))
    est._tree = tree


def _crafted_cases() -> dict[str, tuple[Callable[[], Any], str, Callable[[Any], None]]]:
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import SplineTransformer
    from sklearn.tree import DecisionTreeClassifier

    return {
        "hgb-category": (lambda: HistGradientBoostingRegressor(max_iter=2), "r", _hgb_category),
        "spline-degree": (lambda: SplineTransformer(), "r", _spline_degree),
        "tree-child": (lambda: DecisionTreeClassifier(max_depth=3), "c", _tree_child),
        "forest-feature": (lambda: RandomForestClassifier(n_estimators=2, max_depth=2), "c", _tree_feature),
        "hgb-feature": (lambda: HistGradientBoostingRegressor(max_iter=2), "r", _hgb_feature),
        "kdtree-index": (lambda: KNeighborsClassifier(3), "c", _kd_index),
    }


@pytest.mark.parametrize("case", sorted(_crafted_cases()))
def test_crafted_trusted_types_are_refused_before_predict(case: str, tmp_path: Path, store: Store) -> None:
    make, y, damage = _crafted_cases()[case]
    path = _crafted(tmp_path, _fit(make(), y), damage)
    options = {"method": "transform"} if case.startswith("spline") else None
    with pytest.raises(UnsafeModelError, match=r"model\.skops: refused: "):
        pack(path, "bad", store, sample=_data()[0][:2], options=options)
    assert_store_empty(store)


def test_a_sparse_matrix_with_indices_out_of_range_is_refused() -> None:
    from scipy.sparse import csr_matrix

    m = csr_matrix(np.eye(3))
    check_loaded({"m": m})
    m.indices[0] = 99  # what load_npz would accept from a crafted file
    with pytest.raises(UnsafeModelError, match="sparse matrix"):
        check_loaded({"m": m})


def test_the_trusted_type_list_is_documented() -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "pods.md").read_text()
    listed = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", doc, flags=re.M))
    assert listed == set(VETTED)
