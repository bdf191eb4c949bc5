"""Helpers the framework adapters share: file peeking, copying, one-line errors, output naming."""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError, PodError
from modelpod.model import Batch

MODEL_DIR = "model"


# Native libraries decorate their messages: xgboost with "[12:00:00] /src/file.cc:409: ", torch
# with a plea for enhancement requests. Neither helps the user.
_NOISE = (re.compile(r"^\[[\d:]+\] \S+:\d+: "), re.compile(r"\s*\(Could this error message be improved\?.*$"))


def one_line(exc: BaseException) -> str:
    """The first meaningful line of an exception, short enough for a terminal."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    for noise in _NOISE:
        text = noise.sub("", text)
    return text if len(text) <= 300 else text[:297] + "..."


def unreadable(path: Path, what: str, exc: BaseException) -> FrameworkError:
    return FrameworkError(f"{path.name}: cannot read it as {what}: {one_line(exc)}")


def wrong_format(path: Path, framework: str, expected: str) -> FrameworkError:
    """--framework names an adapter that does not recognise the file."""
    from modelpod.frameworks import detect

    try:
        hint = f" (it looks like a model for --framework {detect(path)})"
    except PodError:
        hint = ""
    return FrameworkError(f"{path.name}: not {expected}, which --framework {framework} expects{hint}")


def peek(path: Path, size: int = 256) -> bytes:
    """The first bytes of a file; empty for anything unreadable (detect must never raise)."""
    try:
        with path.open("rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def zip_names(path: Path) -> list[str] | None:
    """Member names of a zip archive (read from its central directory), or None if not a zip."""
    if peek(path, 4) != b"PK\x03\x04":
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def pick_file(src: Path, detect: Callable[[Path], bool], framework: str, expected: str) -> Path:
    """The model file: ``src`` itself, or the one matching file in the directory ``src``."""
    if src.is_file():
        if not detect(src):
            raise wrong_format(src, framework, expected)
        return src
    found = sorted(p for p in src.iterdir() if p.is_file() and detect(p))
    if len(found) != 1:
        listed = f": {', '.join(p.name for p in found)}" if found else ""
        raise FrameworkError(f"{src}: expected one file holding {expected}, found {len(found)}{listed}")
    return found[0]


def copy_model_file(file: Path, dest: Path) -> str:
    """Copy ``file`` to ``dest/model/``; returns its pod-relative path."""
    target = dest / MODEL_DIR
    target.mkdir(exist_ok=True)
    shutil.copyfile(file, target / file.name)
    return f"{MODEL_DIR}/{file.name}"


def copy_tree(src: Path, dest: Path, skip: Callable[[Path], bool] = lambda p: False) -> Path:
    """Copy a directory to ``dest/model`` (links followed, hidden entries and ``skip`` left out)."""
    root = src.resolve()

    def ignore(directory: str, names: list[str]) -> set[str]:
        base = Path(directory)
        return {
            n for n in names
            if n.startswith(".") or n == "__pycache__" or n.endswith(".pyc") or skip(base / n)
        }

    target = dest / MODEL_DIR
    shutil.copytree(root, target, ignore=ignore, dirs_exist_ok=True)
    return target


def int_option(options: Mapping[str, Any], key: str) -> int | None:
    """An integer option (the CLI passes strings); None when absent."""
    value = options.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FrameworkError(f"option {key}={value!r}: expected an integer") from None


def name_outputs(result: Any, to_numpy: Callable[[Any], np.ndarray[Any, Any]],
                 names: Sequence[str] = ()) -> Batch:
    """Name a model's raw result: one tensor, a sequence of tensors, or a mapping of them.

    ``names`` (the signature's outputs, when known) are used for a single tensor or a sequence of
    the same length; otherwise outputs are ``output-0``, ``output-1``, ...
    """
    if isinstance(result, Mapping):
        return {str(k): to_numpy(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        items: Iterable[Any] = result
        keys = list(names) if len(names) == len(result) else [f"output-{i}" for i in range(len(result))]
        return dict(zip(keys, (to_numpy(v) for v in items), strict=True))
    return {names[0] if len(names) == 1 else "output-0": to_numpy(result)}


def writable(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A C-contiguous writable array (torch warns on read-only buffers such as decoded requests)."""
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, copy=True, order="C")


def bytes_array(values: Iterable[Any]) -> np.ndarray[Any, Any]:
    """A 1-D BYTES tensor (numpy object array of bytes) from strings or bytes."""
    items = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def as_text(array: np.ndarray[Any, Any]) -> list[str]:
    """A BYTES tensor's elements as str, row order kept."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1).tolist()]


def chosen_outputs(request_outputs: Sequence[str], known: Mapping[str, str], framework: str) -> list[str]:
    """The ``--outputs`` names, checked against what the adapter can answer (``known``: name -> meaning)."""
    names = [n.strip() for n in request_outputs if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FrameworkError(f"--outputs {','.join(unknown)}: {framework} pods can answer "
                             + ", ".join(f"{k} ({v})" for k, v in known.items()))
    if len(set(names)) != len(names):
        raise FrameworkError(f"--outputs {','.join(names)}: each output can be named once")
    return names


def text_output(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Strings (class labels) as a BYTES tensor; other arrays as they are."""
    if array.dtype.kind in "OU" and all(isinstance(v, str) for v in array.reshape(-1).tolist()):
        return bytes_array(array.reshape(-1).tolist()).reshape(array.shape)
    return array


def class_outputs(names: Sequence[str], value: Callable[[], np.ndarray[Any, Any]],
                  raw: Callable[[], np.ndarray[Any, Any]], probabilities: bool) -> Batch:
    """The named outputs of a booster: ``label``, ``probabilities``, ``value`` and raw scores.

    ``value`` is the booster's own prediction; for a classifier (``probabilities``) that is the
    positive class's probability (binary, shape [N]) or one column per class. ``label`` is then
    what the libraries' scikit-learn classifiers answer: p > 0.5, or the most likely class;
    ``probabilities`` has one column per class, as their ``predict_proba``.
    """
    out: Batch = {}
    cached: dict[str, np.ndarray[Any, Any]] = {}

    def val() -> np.ndarray[Any, Any]:
        if "v" not in cached:
            cached["v"] = np.asarray(value())
        return cached["v"]

    for name in names:
        if name in ("margin", "raw"):
            out[name] = np.asarray(raw())
        elif name == "value":
            out[name] = val()
        elif not probabilities:
            out[name] = val().astype(np.int64) if name == "label" else val()
        elif name == "label":
            v = val()
            out[name] = (v > 0.5).astype(np.int64) if v.ndim == 1 else v.argmax(axis=1).astype(np.int64)
        else:  # probabilities
            v = val()
            out[name] = np.stack([1 - v, v], axis=1) if v.ndim == 1 else v
    return out
