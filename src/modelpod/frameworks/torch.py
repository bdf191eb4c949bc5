"""PyTorch: TorchScript archives, ``torch.export`` programs and (opt-in) ``torch.save`` pickles.

The format is read from the file's contents, not its suffix: TorchScript archives are zips with
``code/`` and ``constants.pkl``; exported programs are zips with ``archive_format`` (or the older
``serialized_exported_program.json``); anything else ``torch.save`` wrote is a pickle.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import (
    copy_model_file,
    int_option,
    name_outputs,
    peek,
    pick_file,
    unreadable,
    writable,
    zip_names,
)
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec
from modelpod.safety import check_load_allowed, refuse_pickle, scan_pickle

NAME = "torch"
EXTRA = "torch"
IMPORTS = ("torch",)
DISTRIBUTIONS = ("torch",)
TABLES = False  # takes arrays, not a DataFrame
TAKES_TRUST = False  # no --trust: the format has no list of trusted types
SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt", ".torchscript")
EXPECTED = "a PyTorch model (TorchScript .pt, torch.export .pt2, or with --allow-pickle a torch.save file)"
PICKLED = "a torch.save pickle"

# torch dtype names -> OIP datatypes (bfloat16 has none; such outputs are widened to FP32).
TORCH_TYPES = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16", "int8": "INT8", "int16": "INT16",
    "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "bool": "BOOL",
}


def kind(path: Path) -> str | None:
    """``torchscript``, ``export``, ``pickle``, or None when the file is none of them."""
    names = zip_names(path)
    if names is None:
        # torch.save's legacy (non-zip) format is a bare pickle: protocol 2+ opens with 0x80.
        head = peek(path, 2)
        return "pickle" if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 else None
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails or "serialized_exported_program.json" in tails:
        return "export"
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "pickle"
    return None


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES and kind(path) is not None


def _datatype(dtype: Any, path: Path, what: str) -> str:
    name = str(dtype).removeprefix("torch.")
    try:
        return TORCH_TYPES[name]
    except KeyError:
        raise FrameworkError(f"{path.name}: {what} has dtype {name}, which OIP cannot carry") from None


def _shape(value: Any) -> tuple[int, ...]:
    # Dimensions exported with torch.export.Dim are SymInts: free (-1) in the signature.
    return tuple(d if type(d) is int else -1 for d in value.shape)


def _export_signature(program: Any, path: Path) -> Signature | None:
    """Inputs and outputs of an exported program, from the example shapes it was traced with."""
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            return None  # a non-tensor argument: the signature has to come from --sample
        val = nodes[spec.arg.name].meta.get("val")
        if val is None:
            return None
        inputs.append(TensorSpec(spec.arg.name, _datatype(val.dtype, path, f"input {spec.arg.name!r}"), _shape(val)))
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    values = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    kinds = [s.kind for s in program.graph_signature.output_specs]
    user = [v for v, k in zip(values, kinds, strict=True) if k == OutputKind.USER_OUTPUT]
    outputs = []
    names = _export_output_names(program, len(user))
    for name, node in zip(names, user, strict=True):
        val = getattr(node, "meta", {}).get("val")
        if val is None or not hasattr(val, "dtype"):
            return Signature(tuple(inputs))
        datatype = "FP32" if str(val.dtype) == "torch.bfloat16" else _datatype(val.dtype, path, name)
        outputs.append(TensorSpec(name, datatype, _shape(val)))
    return Signature(tuple(inputs), tuple(outputs))


def _export_output_names(program: Any, count: int) -> list[str]:
    """The keys of a dict the module returns (``{"logits": ..., "prob": ...}``), else output-0, output-1, ..."""
    spec = getattr(getattr(program, "call_spec", None), "out_spec", None)
    keys = list(getattr(spec, "context", None) or ()) if getattr(spec, "type", None) is dict else []
    if len(keys) == count and len(set(map(str, keys))) == count:
        return [str(k) for k in keys]
    return [f"output-{i}" for i in range(count)]


def _load_pickle(path: Path, weights_only: bool | None) -> tuple[Any, bool]:
    """torch.load, with ``weights_only`` first unless told otherwise; (object, weights_only used)."""
    import torch

    # mmap: the tensors' storage maps the pod's file, so the replicas of a model (and the page cache)
    # share one copy of the weights; torch.save's zip format allows it, the legacy format does not.
    mapped = zipfile.is_zipfile(path)
    if weights_only is not False:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped), True
        except pickle.UnpicklingError:
            if weights_only:
                raise
    # Only reached after the user opted in and the scan found no dangerous imports.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mapped), False


def _read(path: Path, what: str, weights_only: bool | None = None) -> tuple[Any, bool]:
    """Load a model of the given kind; errors become one line naming the file."""
    import torch

    try:
        if what == "torchscript":
            jit: Any = torch.jit  # torch.jit.load is untyped
            return jit.load(str(path), map_location="cpu"), False
        if what == "export":
            return torch.export.load(str(path)), False
        return _load_pickle(path, weights_only)
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        if what == "export" and "warnings above" in str(exc):
            # torch.export.load logs the real cause and raises a pointer to the log.
            exc = RuntimeError("not a readable torch.export archive (damaged, or from another torch version)")
        raise unreadable(path, EXPECTED, exc) from None


def _forward_args(module: Any) -> list[str]:
    try:
        return [a.name for a in module.forward.schema.arguments if a.name != "self"]
    except AttributeError:  # not every scripted module exposes a schema for forward
        return []


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    file = pick_file(src, detect, NAME, EXPECTED)
    fmt = kind(file)
    assert fmt is not None
    options: dict[str, Any] = {"format": fmt}
    signature = None
    if fmt == "pickle":
        if not request.allow_pickle:
            raise refuse_pickle(file, PICKLED)
        scan_pickle(file)
        obj, weights_only = _read(file, fmt)
        import torch

        if not isinstance(obj, torch.nn.Module):
            raise FrameworkError(
                f"{file.name}: holds a {type(obj).__name__} (a state dict?), not a module, so it cannot run "
                "alone; save it with torch.jit.save or torch.export.save, or pack code that builds it "
                "(--framework python)"
            )
        options["weights_only"] = weights_only
    else:
        obj, _ = _read(file, fmt)
        if fmt == "export":
            signature = _export_signature(obj, file)
        else:
            options["args"] = _forward_args(obj)
    options["file"] = copy_model_file(file, dest)
    return Packed(signature=signature, options=options)


class TorchModel(Model):
    def load(self) -> None:
        assert self.pod is not None
        import torch

        opts: Mapping[str, Any] = self.pod.manifest.options
        path = self.pod.file(str(opts["file"]))
        fmt = str(opts.get("format") or kind(path))
        threads = int_option(opts, "threads")
        if threads:
            # Process-wide in torch: the last model loaded with this option wins.
            torch.set_num_threads(threads)
        self.device = torch.device(str(opts.get("device") or "cpu"))
        if fmt == "pickle":
            check_load_allowed(path, self.pod.manifest.allow_pickle, PICKLED)
            obj, _ = _read(path, fmt, bool(opts.get("weights_only", False)))
            if not isinstance(obj, torch.nn.Module):
                raise FrameworkError(f"{path.name}: holds a {type(obj).__name__}, not a module")
        else:
            obj, _ = _read(path, fmt)
        if fmt == "export":
            self.fn = obj.module().to(self.device)
        else:
            self.fn = obj.to(self.device).eval()
        self.args = [str(a) for a in opts.get("args") or ()]
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        import torch

        order = [t.name for t in self.signature.inputs] or list(inputs)
        tensors = {n: torch.from_numpy(writable(inputs[n])).to(self.device) for n in order}
        with torch.inference_mode():
            by_name = bool(self.args) and set(order) <= set(self.args)
            result = self.fn(**tensors) if by_name else self.fn(*tensors.values())
        return name_outputs(result, _to_numpy, [t.name for t in self.signature.outputs])

    def unload(self) -> None:
        self.__dict__.pop("fn", None)
        super().unload()


def _to_numpy(value: Any) -> np.ndarray[Any, Any]:
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return np.asarray(value)


def load(pod: Pod) -> Model:
    return TorchModel(pod)
