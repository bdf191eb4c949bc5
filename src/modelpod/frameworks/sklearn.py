"""scikit-learn: skops files (safe by default) and, with --allow-pickle, pickle/joblib files.

A skops file may hold the types skops trusts by default, the types modelpod has vetted
(``_skops_trust.VETTED``: trees, neighbour trees, kernels, ...; their content is checked at load),
and the types the user names with ``--trust``, which the manifest records; nothing else loads.

A pod answers like the estimator's ``predict`` (output ``output-0``), or another method with
``--option method=...``, or several named outputs with ``--outputs label,probabilities``
(``label``: predict, ``probabilities``: predict_proba, ``scores``: decision_function,
``transform``). A classifier's ``classes_`` go into the signature as ``class_labels``.
Packed with a table sample (a DataFrame, .csv, .parquet, .jsonl, or an .npz of named columns),
the model is handed a DataFrame with the training dtypes (see ``modelpod.table``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from modelpod import table
from modelpod.errors import FrameworkError, UnsafeModelError, UsageError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._sklearn_fast import fast_method
from modelpod.frameworks._skops_trust import VETTED, check_loaded
from modelpod.frameworks._util import chosen_outputs, one_line, pick_file, text_output, unreadable
from modelpod.model import Batch, Model
from modelpod.pod import Pod, numpy_dtype
from modelpod.safety import check_load_allowed, refuse_pickle, scan_pickle

NAME = "sklearn"
EXTRA = "sklearn"
IMPORTS = ("sklearn", "skops")
DISTRIBUTIONS = ("scikit-learn", "skops")
PICKLES = (".pkl", ".pickle", ".joblib")
EXPECTED = "a scikit-learn model (.skops, or with --allow-pickle .pkl/.joblib)"
METHODS = ("predict", "predict_proba", "decision_function", "transform")
TAKES_TRUST = True  # pack honours PackRequest.trust
TABLES = True  # a table sample makes a table signature; predict is handed a DataFrame
OUTPUTS = {"label": "predict", "probabilities": "predict_proba", "scores": "decision_function",
           "transform": "transform"}


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix in (".skops", *PICKLES)


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    file = pick_file(src, detect, NAME, EXPECTED)
    options: dict[str, Any] = {"file": f"model/{file.name}"}
    trust: tuple[str, ...] = ()
    if file.suffix in PICKLES:
        if request.trust:
            raise UsageError(f"{file.name}: --trust is for skops files; a pickle needs --allow-pickle")
        if not request.allow_pickle:
            raise refuse_pickle(file, "a pickled scikit-learn model")
        scan_pickle(file)
    else:
        needed = _untrusted(file, ())
        unasked = [t for t in needed if t not in request.trust]
        if unasked:
            raise UnsafeModelError(
                f"{file.name}: the skops file holds types neither skops nor modelpod trusts "
                f"({', '.join(unasked)}); if you trust where the file comes from, pass "
                f"--trust {','.join(unasked)}"
            )
        unused = sorted(set(request.trust) - set(needed) - set(VETTED))
        if unused:
            raise UsageError(f"--trust {','.join(unused)}: {file.name} holds no such type; nothing to trust")
        trust = tuple(needed)
    method = str(request.options.get("method", "predict"))
    if method not in METHODS:
        raise FrameworkError(f"sklearn method {method!r} not supported; use one of {', '.join(METHODS)}")
    options["method"] = method
    if request.outputs:
        options["outputs"] = chosen_outputs(request.outputs, OUTPUTS, NAME)
    (dest / "model").mkdir()
    shutil.copyfile(file, dest / "model" / file.name)
    return Packed(options=options, trust=trust)


def _untrusted(file: Path, trust: Sequence[str]) -> list[str]:
    """The types in a skops file that neither skops, modelpod's vetted list nor ``trust`` covers."""
    sio = skops_io()
    try:
        found = sio.get_untrusted_types(file=file)
    except Exception as exc:  # skops raises zipfile, json and its own errors for a damaged file
        raise unreadable(file, "a skops file", exc) from None
    return sorted(set(found) - set(VETTED) - set(trust))


class SklearnModel(Model):
    computes_only = True

    def load(self) -> None:
        assert self.pod is not None
        opts: Mapping[str, Any] = self.pod.manifest.options
        path = self.pod.file(str(opts["file"]))
        if path.suffix in PICKLES:
            check_load_allowed(path, self.pod.manifest.allow_pickle, "a pickled scikit-learn model")
            import joblib

            try:
                self.estimator = joblib.load(path)
            except (OSError, EOFError, ValueError, AttributeError, ImportError) as exc:
                raise unreadable(path, "a pickled scikit-learn model", exc) from None
        else:
            # Trusted: skops' defaults, modelpod's vetted types, and exactly the --trust types the
            # manifest records (its digest covers them); skops refuses anything else.
            recorded = self.pod.manifest.trust
            sio = skops_io()
            try:
                self.estimator = sio.load(path, trusted=sorted({*VETTED, *recorded}))
            except sio.exceptions.UntrustedTypesFoundException:
                missing = _untrusted(path, recorded)
                raise UnsafeModelError(
                    f"{path.name}: holds types this pod does not trust ({', '.join(missing)}); "
                    f"re-pack it with --trust {','.join(missing)} if you trust its source") from None
            except Exception as exc:  # a damaged file: zipfile, json and skops' own errors
                raise UnsafeModelError(f"{path.name}: skops refused to load it: {one_line(exc)}") from exc
            try:
                check_loaded(self.estimator)
            except UnsafeModelError as exc:
                self.__dict__.pop("estimator", None)
                raise UnsafeModelError(f"{path.name}: {exc}") from None
        self.method = self._method(str(opts.get("method", "predict")))
        self.outputs = [(str(n), self._method(OUTPUTS[str(n)])) for n in opts.get("outputs") or ()]
        super().load()

    def _method(self, name: str) -> Any:
        fn = getattr(self.estimator, name, None)
        if fn is None:
            raise FrameworkError(f"{type(self.estimator).__name__} has no {name}(); it cannot answer that output")
        sig = self.signature
        if not sig.is_table and len(sig.inputs) == 1:  # a linear model's own product, proven equal at load
            fast = fast_method(self.estimator, name, numpy_dtype(sig.inputs[0].datatype))
            if fast is not None:
                return fast
        return fn

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        if self.signature.is_table or len(inputs) > 1:
            x: Any = table.to_frame(inputs, self.signature)  # a table: named columns, str strings
        else:
            (x,) = inputs.values()
        if not self.outputs:
            return {"output-0": text_output(np.asarray(self.method(x)))}
        return {name: text_output(np.asarray(fn(x))) for name, fn in self.outputs}

    def table_columns(self) -> list[str] | None:
        names = getattr(self.estimator, "feature_names_in_", None)
        return None if names is None else [str(n) for n in names]

    def model_parameters(self) -> dict[str, Any]:
        classes = getattr(self.estimator, "classes_", None)
        if classes is None:
            return {}
        return {"class_labels": np.asarray(classes).tolist()}

    def unload(self) -> None:
        self.__dict__.pop("estimator", None)
        self.__dict__.pop("method", None)
        self.__dict__.pop("outputs", None)
        super().unload()


def load(pod: Pod) -> Model:
    return SklearnModel(pod)


# Imported by skops.io's first import only for nothing: see ``skops_io``.
_NOT_NEEDED = ("sklearn.externals.array_api_compat.torch", "pytest")


class _Refuse(importlib.abc.MetaPathFinder):
    """An import hook that makes the named modules look absent (those not imported yet)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname in self.names:
            raise ImportError(f"{fullname} is not needed here", name=fullname)
        return None


def skops_io() -> ModuleType:
    """``skops.io``, imported without the modules its import drags in for nothing.

    On import skops lists scikit-learn's estimators (``sklearn.utils.all_estimators``), which
    imports every sklearn package: among them the array-API shim for torch, which imports all of
    torch where torch is installed (about 250 MB and seconds, for a model that never sees a
    tensor), and sklearn's test helpers, which import pytest where it is installed. Both are
    optional to sklearn (it handles their ImportError, as where they are not installed), and the
    estimator list comes out the same.
    """
    if "skops.io" not in sys.modules:
        import sklearn  # noqa: F401 - first, as usual: its own import looks for torch in sys.modules

        hook = _Refuse(_NOT_NEEDED)
        sys.meta_path.insert(0, hook)
        try:
            importlib.import_module("skops.io")
        finally:
            sys.meta_path.remove(hook)
    return sys.modules["skops.io"]
