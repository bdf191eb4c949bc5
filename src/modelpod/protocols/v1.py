"""The KServe v1 / TensorFlow Serving REST protocol, translated onto the same engine as OIP v2.

Routes (``/versions/{v}`` takes a version number; TF Serving's ``/labels/{l}`` an alias)::

    GET  /v1/models                                   {"models": [names]}            (KServe v1)
    GET  /v1/models/{m}[/versions/{v}|/labels/{l}]    model status                   (TF Serving)
    GET  /v1/models/{m}[...]/metadata                 signature_def                  (TF Serving)
    POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict

A predict body holds ``instances`` (row format: one entry per row; a list of objects names the
inputs, or a table's columns) or ``inputs`` (columnar: the whole batch, an object for several
inputs). Row requests are answered ``{"predictions": [...]}`` (one entry per row, an object per
row when there are several outputs), columnar ones ``{"outputs": ...}``. Binary values are
``{"b64": "..."}``, in and out (outputs whose name ends in ``_bytes``), as TF Serving does.
Model status carries TF Serving's ``model_version_status`` and KServe's ``name`` and ``ready``.
Auth and errors (``{"error": "..."}``) are those of the OIP routes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
import orjson

from modelpod import table
from modelpod.errors import InvalidRequestError, NotFoundError
from modelpod.pod import Signature, TensorSpec
from modelpod.protocols.auth import EVERY_MODEL, INFER, READ
from modelpod.protocols.codec import tensor_from_json
from modelpod.protocols.http import Request, Response
from modelpod.serving.messages import InferRequest
from modelpod.serving.registry import ModelEntry, ModelState

if TYPE_CHECKING:
    from modelpod.protocols.rest import RestApp

SIGNATURE_NAME = "serving_default"
_TF_STATES = {ModelState.READY: "AVAILABLE", ModelState.LOADING: "LOADING", ModelState.UNLOADING: "UNLOADING",
              ModelState.UNAVAILABLE: "END"}
_TF_TYPES = {"FP16": "DT_HALF", "FP32": "DT_FLOAT", "FP64": "DT_DOUBLE", "INT8": "DT_INT8", "INT16": "DT_INT16",
             "INT32": "DT_INT32", "INT64": "DT_INT64", "UINT8": "DT_UINT8", "UINT16": "DT_UINT16",
             "UINT32": "DT_UINT32", "UINT64": "DT_UINT64", "BOOL": "DT_BOOL", "BYTES": "DT_STRING"}


async def handle(app: RestApp, req: Request) -> Response:
    """Answer one ``/v1/...`` request (``app`` gives the engine, auth and body decoding)."""
    path = req.path
    if path in ("/v1/models", "/v1/models/"):
        _allow(app, req, "GET", READ, EVERY_MODEL)
        names = sorted({row["name"] for row in app.engine.repository_index() if row.get("reason") != _IN_STORE})
        return _json({"models": names})
    if not path.startswith("/v1/models/"):
        raise NotFoundError(f"no route {path}")
    name, version, action = _parse(path[len("/v1/models/"):])
    if action == "predict":
        _allow(app, req, "POST", INFER, name)
        return await _predict(app, req, name, version)
    if action in ("classify", "regress", "explain"):
        raise NotFoundError(f":{action} is not served; use :predict")
    _allow(app, req, "GET", READ, name)
    if action == "metadata":
        return _json(_metadata(app, name, version))
    if action:
        raise NotFoundError(f"no route {path}")
    return _json(_status(app, name, version))


_IN_STORE = "in the store, not loaded"


def _allow(app: RestApp, req: Request, method: str, scope: str, model: str) -> None:
    from modelpod.protocols.rest import _allow as allow

    allow(req.method, method)
    app._authorize(req, scope, model)


def _parse(rest: str) -> tuple[str, str | None, str]:
    """``m[/versions/v|/labels/l][:verb|/metadata]`` -> (name, version or alias, verb)."""
    rest, _, verb = rest.partition(":")
    parts = [unquote(p) for p in rest.split("/")]
    if parts and parts[-1] == "metadata" and not verb:
        parts, verb = parts[:-1], "metadata"
    if not parts or not parts[0]:
        raise NotFoundError("no model name in the path")
    if len(parts) == 1:
        return parts[0], None, verb
    if len(parts) == 3 and parts[1] in ("versions", "labels") and parts[2]:
        if parts[1] == "versions" and not parts[2].isdigit():
            raise InvalidRequestError(f"version {parts[2]!r} must be a number; use /labels/ for an alias")
        return parts[0], parts[2], verb
    raise NotFoundError(f"no route /v1/models/{rest}")


# -- status and metadata ---------------------------------------------------------------------------
def _status(app: RestApp, name: str, version: str | None) -> dict[str, Any]:
    entries = [app.engine.resolve(name, version)] if version else list(app.engine.registry.versions(name).values())
    rows = []
    for e in sorted(entries, key=lambda e: e.version or 0, reverse=True):
        if e.failed:
            state, code, message = "END", "UNKNOWN", e.reason or "the model failed to load"
        elif e.state is ModelState.UNAVAILABLE:  # lazily loaded or evicted: its next request loads it
            state, code, message = ("AVAILABLE" if e.available else "END"), "OK", ""
        else:
            state, code, message = _TF_STATES[e.state], "OK", ""
        rows.append({"version": e.version_text or "0", "state": state,
                     "status": {"error_code": code, "error_message": message}})
    ready = app.engine.model_ready(name, version)
    return {"name": name, "ready": ready, "model_version_status": rows}


def _metadata(app: RestApp, name: str, version: str | None) -> dict[str, Any]:
    entry = app.engine.resolve(name, version)

    def tensors(specs: Sequence[TensorSpec]) -> dict[str, Any]:
        return {t.name: {"dtype": _TF_TYPES.get(t.datatype, "DT_INVALID"), "name": t.name,
                         "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in t.shape],
                                          "unknown_rank": False}} for t in specs}

    signature = {"inputs": tensors(entry.signature.inputs), "outputs": tensors(entry.signature.outputs),
                 "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": entry.name, "signature_name": "", "version": entry.version_text},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE_NAME: signature},
                                           "@type": "type.googleapis.com/tensorflow.serving.SignatureDefMap"}}}


# -- predict ---------------------------------------------------------------------------------------
async def _predict(app: RestApp, req: Request, name: str, version: str | None) -> Response:
    body = app._json(app._decoded(req))
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object with 'instances' or 'inputs'")
    signature_name = body.get("signature_name")
    if signature_name not in (None, "", SIGNATURE_NAME):
        raise InvalidRequestError(f"signature_name {signature_name!r}: this model serves only {SIGNATURE_NAME!r}")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidRequestError("the request needs exactly one of 'instances' (rows) or 'inputs' (columns)")
    entry = app.engine.resolve(name, version)
    rows = "instances" in body
    inputs = _rows(body["instances"], entry) if rows else _columns(body["inputs"], entry)
    result = await app.engine.infer(name, version, InferRequest(inputs), protocol="rest", started=req.received,
                                    headers=req.headers)
    outputs = _ordered(result.outputs, entry.signature)
    response = _json({"predictions": _predictions(outputs)} if rows else {"outputs": _outputs(outputs)})
    response.headers = [("modelpod-variant", result.variant or result.model_name)]  # as on every inference
    return response


def _specs(entry: ModelEntry, names: Sequence[str]) -> list[TensorSpec]:
    sig = entry.signature
    if not sig.inputs:
        return [TensorSpec(n, "", ()) for n in names]  # no signature: datatypes come from the JSON
    unknown = [n for n in names if sig.input(n) is None]
    if unknown:
        raise InvalidRequestError(f"model {entry.label} has no input(s) {', '.join(unknown)}; "
                                  f"inputs: {', '.join(t.name for t in sig.inputs)}")
    return [t for n in names for t in sig.inputs if t.name == n]


def _rows(instances: Any, entry: ModelEntry) -> dict[str, Any]:
    if not isinstance(instances, list) or not instances:
        raise InvalidRequestError("'instances' must be a non-empty list, one entry per row")
    sig = entry.signature
    named = all(isinstance(i, dict) and "b64" not in i for i in instances)
    if named and sig.is_table:
        return table.records_batch(_objects(instances), sig)  # rows of a table: column -> value
    if named:
        keys = list(instances[0])
        if any(list(i) != keys and set(i) != set(keys) for i in instances):
            raise InvalidRequestError("every instance must name the same inputs")
        return {t.name: _array(t, [i[t.name] for i in instances]) for t in _specs(entry, keys)}
    if any(isinstance(i, dict) and "b64" not in i for i in instances):
        raise InvalidRequestError("'instances' mixes objects and values")
    spec = _single(entry)
    return {spec.name: _array(spec, instances)}


def _columns(inputs: Any, entry: ModelEntry) -> dict[str, Any]:
    if isinstance(inputs, dict) and "b64" not in inputs:
        if not inputs:
            raise InvalidRequestError("'inputs' must name at least one input")
        specs = _specs(entry, list(inputs))
        return {t.name: _array(t, inputs[t.name]) for t in specs}
    spec = _single(entry)
    return {spec.name: _array(spec, inputs)}


def _single(entry: ModelEntry) -> TensorSpec:
    sig = entry.signature
    if len(sig.inputs) > 1:
        raise InvalidRequestError(f"model {entry.label} has {len(sig.inputs)} inputs "
                                  f"({', '.join(t.name for t in sig.inputs)}): name them in each instance")
    return sig.inputs[0] if sig.inputs else TensorSpec("input-0", "", ())


def _objects(items: list[Any]) -> np.ndarray[Any, Any]:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _array(spec: TensorSpec, data: Any) -> np.ndarray[Any, Any]:
    """One input's JSON value (nested lists, strings, ``{"b64": ...}``) as an array of its datatype."""
    shape = _shape(data)
    datatype = spec.datatype or _guess(data)
    if datatype == "BYTES":
        flat = [_binary(v, spec.name) for v in _flat(data)]
        return tensor_from_json(spec.name, "BYTES", shape, flat)
    return tensor_from_json(spec.name, datatype, shape, data)


def _guess(data: Any) -> str:
    first = next(iter(_flat(data)), 0.0)
    if isinstance(first, (str, dict)):
        return "BYTES"
    return "BOOL" if isinstance(first, bool) else "INT64" if isinstance(first, int) else "FP32"


def _shape(data: Any) -> tuple[int, ...]:
    shape: list[int] = []
    node = data
    while isinstance(node, list):
        shape.append(len(node))
        if not node:
            break
        node = node[0]
    return tuple(shape)


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flat(item) if isinstance(item, list) else [item])
    return out


def _binary(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        b64 = value.get("b64")
        if not isinstance(b64, str) or len(value) != 1:
            raise InvalidRequestError(f"input {name!r}: binary values are {{\"b64\": \"...\"}}")
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"input {name!r}: not valid base64") from None
    return value


# -- answers ---------------------------------------------------------------------------------------
def _ordered(outputs: Mapping[str, np.ndarray[Any, Any]], sig: Signature) -> dict[str, np.ndarray[Any, Any]]:
    order = [t.name for t in sig.outputs if t.name in outputs]
    return {n: np.asarray(outputs[n]) for n in [*order, *(k for k in outputs if k not in order)]}


def _value(name: str, arr: np.ndarray[Any, Any]) -> Any:
    if arr.dtype.kind in "OSU":
        wrap = name.endswith("_bytes")
        flat = [_text(v, wrap) for v in arr.reshape(-1).tolist()]
        return np.asarray(flat, dtype=object).reshape(arr.shape).tolist() if arr.ndim else flat[0]
    return arr.tolist()


def _text(value: Any, wrap: bool) -> Any:
    if isinstance(value, bytes):
        if wrap:
            return {"b64": base64.b64encode(value).decode()}
        return value.decode("utf-8", errors="replace")
    return value


def _predictions(outputs: Mapping[str, np.ndarray[Any, Any]]) -> list[Any]:
    if len(outputs) == 1:
        ((name, arr),) = outputs.items()
        return list(_value(name, arr)) if arr.ndim else [_value(name, arr)]
    rows = {len(a) if a.ndim else 1 for a in outputs.values()}
    if len(rows) != 1:
        raise InvalidRequestError("the outputs have different numbers of rows; send 'inputs' (columnar) instead")
    values = {n: _value(n, a) for n, a in outputs.items()}
    return [{n: v[i] for n, v in values.items()} for i in range(rows.pop())]


def _outputs(outputs: Mapping[str, np.ndarray[Any, Any]]) -> Any:
    if len(outputs) == 1:
        ((name, arr),) = outputs.items()
        return _value(name, arr)
    return {n: _value(n, a) for n, a in outputs.items()}


def _json(obj: Any) -> Response:
    return Response(200, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))
