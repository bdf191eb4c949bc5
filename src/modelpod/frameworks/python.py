"""Custom code: a directory holding a ``modelpod.Model`` subclass, whose type hints are its schema.

``def predict(self, text: list[str]) -> list[float]`` serves input ``text`` (BYTES, [-1]) and
output ``output-0`` (FP64, [-1]: Python floats are 64-bit). Supported hints: ``list[str]``, ``list[bytes]``,
``list[float]``, ``list[int]``, ``list[bool]`` (nested lists add dimensions), and
``Annotated[np.ndarray, Tensor("FP32", (-1, 4))]``; a ``TypedDict`` return names several outputs
(a ``dict[str, ...]`` return does too, with the signature then taken from ``--sample``). A class
that keeps the base ``predict(self, inputs)`` is called with the batch as it is.

The user's module is imported from the pod under a unique name; the code directory is on
``sys.path`` only while importing and loading, and sibling modules imported then are dropped from
``sys.modules`` afterwards, so two pods that each ship a ``utils.py`` never see each other's.
"""

from __future__ import annotations

import ast
import collections.abc
import contextlib
import importlib.util
import inspect
import itertools
import re
import shutil
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import MODEL_DIR, as_text, copy_tree, one_line, wrong_format
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec, numpy_dtype
from modelpod.safety import check_load_allowed, looks_like_pickle, refuse_pickle, scan_pickle

NAME = "python"
EXTRA = ""
IMPORTS: tuple[str, ...] = ()
DISTRIBUTIONS: tuple[str, ...] = ()
TABLES = False  # takes arrays, not a DataFrame
TAKES_TRUST = False  # no --trust: the format has no list of trusted types
EXPECTED = "a directory of Python code holding a modelpod.Model subclass"
PICKLED = "a pickle in the code directory"
# Files that hold weights go to their own image layer even in a code directory.
WEIGHT_SUFFIXES = (
    ".pt", ".pth", ".pt2", ".bin", ".ckpt", ".safetensors", ".onnx", ".npy", ".npz", ".h5", ".keras",
    ".skops", ".pkl", ".pickle", ".joblib", ".ubj", ".pb", ".gguf", ".msgpack", ".tflite",
)
LARGE = 1 << 20
_LEAVES: dict[Any, tuple[str, str]] = {
    str: ("BYTES", "text"), bytes: ("BYTES", "bytes"), bool: ("BOOL", "list"),
    int: ("INT64", "list"), float: ("FP64", "list"),  # Python floats are 64-bit
}
_LISTS = (list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)
_COUNTER = itertools.count()
_PREFIX = "modelpod_user_"
_MENTION = re.compile(rb"\bmodelpod\b")


@dataclass(frozen=True)
class Tensor:
    """Marks an array hint with its OIP datatype and shape: ``Annotated[np.ndarray, Tensor("FP32", (-1, 4))]``."""

    datatype: str
    shape: tuple[int, ...] = (-1,)

    def __post_init__(self) -> None:
        TensorSpec("tensor", self.datatype, tuple(self.shape))  # validates both


# -- detection ---------------------------------------------------------------------------------
def _mentions_modelpod(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return bool(_MENTION.search(fh.read(1 << 16)))
    except OSError:
        return False


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".py" and _mentions_modelpod(path)
    if not path.is_dir():
        return False
    sources = list(path.glob("*.py"))
    if not sources:
        return False
    from modelpod.frameworks import FRAMEWORKS, module

    others = [module(n) for n in FRAMEWORKS if n != NAME]
    if any(m.detect(path) for m in others):
        return False  # e.g. a transformers directory that ships modelling code
    if any(_mentions_modelpod(p) for p in sources):
        return True
    return not any(m.detect(child) for m in others for child in path.iterdir())


# -- finding and importing the user's class ------------------------------------------------------
def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_entrypoints(root: Path) -> list[str]:
    """``module:Class`` for each class whose bases name ``Model``, in files that mention modelpod."""
    found = []
    for file in sorted(root.rglob("*.py")):
        if not _mentions_modelpod(file):
            continue
        try:
            tree = ast.parse(file.read_bytes(), filename=file.name)
        except (SyntaxError, ValueError) as exc:
            raise FrameworkError(f"{file.name}: not valid Python: {one_line(exc)}") from None
        module = _module_name(file.relative_to(root))
        for node in tree.body:
            if module and isinstance(node, ast.ClassDef) and any(_names_model(b) for b in node.bases):
                found.append(f"{module}:{node.name}")
    return found


def _names_model(base: ast.expr) -> bool:
    return (isinstance(base, ast.Name) and base.id == "Model") or (
        isinstance(base, ast.Attribute) and base.attr == "Model")


@contextlib.contextmanager
def code_path(root: Path) -> Iterator[None]:
    """``root`` on sys.path for the duration; modules imported from it are forgotten after."""
    entry = str(root)
    before = set(sys.modules)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if not name.startswith(_PREFIX) and file and Path(file).resolve().is_relative_to(root.resolve()):
                del sys.modules[name]


def import_entrypoint(root: Path, entrypoint: str) -> tuple[type[Model], ModuleType]:
    """Import ``module:Class`` from the code directory ``root`` under a unique module name."""
    mod_name, _, cls_name = entrypoint.partition(":")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", mod_name) or not cls_name.isidentifier():
        raise FrameworkError(f"entrypoint {entrypoint!r}: use MODULE:CLASS, e.g. predict:Classifier")
    rel = Path(*mod_name.split("."))
    file, package = root / rel.with_suffix(".py"), root / rel / "__init__.py"
    if not file.is_file():
        file = package
        if not file.is_file():
            raise FrameworkError(f"entrypoint {entrypoint!r}: no {rel}.py in the code directory")
    unique = f"{_PREFIX}{next(_COUNTER)}_{mod_name.replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(
        unique, file, submodule_search_locations=[str(file.parent)] if file == package else None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module  # dataclasses and get_type_hints look the module up by name
    try:
        with code_path(root):
            spec.loader.exec_module(module)
    except Exception as exc:  # the user's module raised while being imported
        del sys.modules[unique]
        raise FrameworkError(f"{file.name}: importing it failed: {type(exc).__name__}: {one_line(exc)}") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        del sys.modules[unique]
        raise FrameworkError(f"entrypoint {entrypoint!r}: {cls_name} is not a modelpod.Model subclass")
    return cls, module


def forget(module: ModuleType) -> None:
    sys.modules.pop(module.__name__, None)


# -- type hints -> schema ----------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """One typed parameter or output: its tensor spec and how values convert."""

    spec: TensorSpec
    kind: str  # text | bytes | list | array


SUPPORTED = ("list[str], list[bytes], list[float], list[int], list[bool] (nested lists too), "
             "Annotated[np.ndarray, Tensor(datatype, shape)]")


def field_of(name: str, hint: Any, where: str) -> Field:
    if typing.get_origin(hint) is typing.Annotated:
        base, *marks = typing.get_args(hint)
        tensor = next((m for m in marks if isinstance(m, Tensor)), None)
        if tensor is not None:
            kind = "list" if typing.get_origin(base) in _LISTS else "array"
            return Field(TensorSpec(name, tensor.datatype, tuple(tensor.shape)), kind)
        hint = base
    depth, leaf = 0, hint
    while typing.get_origin(leaf) in _LISTS:
        args = typing.get_args(leaf)
        leaf, depth = (args[0] if args else Any), depth + 1
    if depth and leaf in _LEAVES:
        datatype, kind = _LEAVES[leaf]
        return Field(TensorSpec(name, datatype, (-1,) * depth), kind)
    if hint is np.ndarray or typing.get_origin(hint) is np.ndarray:
        raise FrameworkError(f"{where}: annotate arrays with their datatype and shape, "
                             f"e.g. Annotated[np.ndarray, Tensor('FP32', (-1, 4))]")
    raise FrameworkError(f"{where}: type hint {hint!r} is not supported; use {SUPPORTED}")


@dataclass(frozen=True)
class Schema:
    """How to call a user's predict: ``typed`` (one argument per input) or ``batch`` (the mapping)."""

    mode: str
    inputs: tuple[Field, ...] = ()
    outputs: tuple[Field, ...] = ()

    @property
    def signature(self) -> Signature | None:
        if self.mode == "batch":
            return None
        return Signature(tuple(f.spec for f in self.inputs), tuple(f.spec for f in self.outputs))

    @classmethod
    def of(cls, model: type[Model]) -> Schema:
        fn = model.predict
        if fn is Model.predict:
            raise FrameworkError(f"{model.__name__} does not define predict()")
        where = f"{model.__name__}.predict"
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:  # a hint that does not resolve in the user's module
            raise FrameworkError(f"{where}: cannot resolve its type hints: {one_line(exc)}") from None
        params = list(inspect.signature(fn).parameters.values())[1:]
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            raise FrameworkError(f"{where}: *args and **kwargs cannot be a schema; name each input")
        if len(params) == 1:
            hint = hints.get(params[0].name)
            if hint is None or typing.get_origin(hint) in _MAPPINGS or hint in _MAPPINGS:
                return cls("batch")
        missing = [p.name for p in params if p.name not in hints]
        if missing or not params:
            raise FrameworkError(f"{where}: annotate every parameter ({', '.join(missing) or 'none given'}); "
                                 f"use {SUPPORTED}")
        inputs = tuple(field_of(p.name, hints[p.name], f"{where}({p.name})") for p in params)
        return cls("typed", inputs, _outputs(hints.get("return"), where))


def _outputs(hint: Any, where: str) -> tuple[Field, ...]:
    if hint is None or hint is type(None):
        return ()
    if typing.is_typeddict(hint):
        fields = typing.get_type_hints(hint, include_extras=True)
        return tuple(field_of(n, h, f"{where} -> {n}") for n, h in fields.items())
    if typing.get_origin(hint) in _MAPPINGS or hint in _MAPPINGS:
        return ()  # names known only at run time: the sample tells them
    return (field_of("output-0", hint, f"{where} return"),)


def to_python(array: np.ndarray[Any, Any], kind: str) -> Any:
    if kind == "array":
        return array
    if kind == "text":
        return np.asarray(as_text(array), dtype=object).reshape(array.shape).tolist()
    return array.tolist()


def to_array(value: Any, spec: TensorSpec | None) -> np.ndarray[Any, Any]:
    if spec is not None and spec.datatype != "BYTES":
        return np.asarray(value, dtype=numpy_dtype(spec.datatype))
    arr = np.asarray(value, dtype=object if spec is not None else None)
    if arr.dtype.kind in "OUS":
        flat = [v.encode() if isinstance(v, str) else v for v in arr.reshape(-1).tolist()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(arr.shape)
    return arr


# -- the adapter -------------------------------------------------------------------------------
def _pickles(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and looks_like_pickle(p)]


def _role(path: Path) -> str:
    if path.suffix == ".py":
        return "code"
    return "weights" if path.suffix in WEIGHT_SUFFIXES or path.stat().st_size >= LARGE else "code"


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    if src.is_file() and src.suffix == ".py":
        (dest / MODEL_DIR).mkdir()
        shutil.copyfile(src, dest / MODEL_DIR / src.name)
    elif src.is_dir() and any(src.rglob("*.py")):
        copy_tree(src, dest, skip=lambda p: p.is_dir() and (p / "pyvenv.cfg").exists())  # no virtualenvs
    else:
        raise wrong_format(src, NAME, EXPECTED)
    root = dest / MODEL_DIR
    for file in _pickles(root):
        if not request.allow_pickle:
            raise refuse_pickle(file, PICKLED)
        scan_pickle(file)
    entrypoint = request.entrypoint
    if entrypoint is None:
        found = find_entrypoints(root)
        if len(found) != 1:
            what = f"found {len(found)}: {', '.join(found)}" if found else "found none"
            raise FrameworkError(f"{src.name}: expected one modelpod.Model subclass ({what}); "
                                 "pass --entrypoint MODULE:CLASS")
        entrypoint = found[0]
    cls, module = import_entrypoint(root, entrypoint)
    try:
        declared = cls.signature
        signature = declared if not declared.empty else Schema.of(cls).signature
    finally:
        forget(module)
    roles = {p.relative_to(dest).as_posix(): _role(p) for p in root.rglob("*") if p.is_file()}
    return Packed(signature=signature, entrypoint=entrypoint, roles=roles)


class PythonModel(Model):
    """Wraps the user's Model: imports it from the pod, converts typed calls."""

    def load(self) -> None:
        assert self.pod is not None
        root = self.pod.file(MODEL_DIR)
        for file in _pickles(root):
            check_load_allowed(file, self.pod.manifest.allow_pickle, PICKLED)
        entrypoint = self.pod.manifest.entrypoint
        if not entrypoint:
            raise FrameworkError(f"pod {self.pod.name}: the manifest names no entrypoint")
        cls, self.module = import_entrypoint(root, entrypoint)
        self.schema = Schema.of(cls)
        self.user = _instantiate(cls, self.pod)
        with code_path(root):
            self.user.load()
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        if self.schema.mode == "batch":
            return dict(self.user.predict(inputs))
        call: Callable[..., Any] = self.user.predict
        result = call(**{f.spec.name: to_python(inputs[f.spec.name], f.kind) for f in self.schema.inputs})
        specs = {f.spec.name: f.spec for f in self.schema.outputs}
        specs.update({t.name: t for t in self.signature.outputs if t.name not in specs})
        if isinstance(result, Mapping):
            return {str(k): to_array(v, specs.get(str(k))) for k, v in result.items()}
        return {"output-0": to_array(result, specs.get("output-0"))}

    def unload(self) -> None:
        user = self.__dict__.pop("user", None)
        if user is not None:
            user.unload()
        module = self.__dict__.pop("module", None)
        if module is not None:
            forget(module)
        super().unload()


def _instantiate(cls: type[Model], pod: Pod) -> Model:
    try:
        inspect.signature(cls).bind(pod)
    except TypeError:
        user = cls()
        user.pod = pod  # a user __init__ without arguments still gets to see its pod
        return user
    return cls(pod)


def load(pod: Pod) -> Model:
    return PythonModel(pod)


__all__ = ["DISTRIBUTIONS", "EXTRA", "IMPORTS", "NAME", "TABLES", "TAKES_TRUST", "Tensor", "detect", "load", "pack"]
