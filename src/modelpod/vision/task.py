"""Detector and classifier pods: the task config read at pack (Ultralytics metadata or options),
their signature, and the run-time pipeline (decode, letterbox, model, boxes back).

Several images per request: ``images`` is ``[I]``. Detection outputs are the detections of every
image, concatenated in image order, plus ``detections`` ``[I]``: how many rows belong to each image.
Classification outputs are ``[I, k]``: one row of top-k per image.
"""

from __future__ import annotations

import ast
import base64
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from modelpod.errors import FrameworkError, InvalidRequestError
from modelpod.model import parameters_of
from modelpod.pod import Signature, TensorSpec
from modelpod.vision import TASKS
from modelpod.vision.boxes import LAYOUTS, Options, detect, guess_layout, to_original
from modelpod.vision.image import DEFAULT_MAX_PIXELS, center_crop, decode, letterbox, to_tensor, unwrap

Array = np.ndarray[Any, Any]
Run = Callable[[Array], Array]  # NCHW float32 batch -> the model's first output
_T = TypeVar("_T")

INPUT = "images"
DEFAULT_MAX_IMAGES = 64
DEFAULT_TOP_K = 5
DETECT_OUTPUTS = (
    TensorSpec("boxes", "FP32", (-1, 4)), TensorSpec("scores", "FP32", (-1,)),
    TensorSpec("class_ids", "INT64", (-1,)), TensorSpec("class_names", "BYTES", (-1,)),
    TensorSpec("detections", "INT64", (-1,)),
    TensorSpec("annotated", "BYTES", (-1,)),  # only with annotate: true; base64 PNG (JSON carries text)
)
CLASSIFY_OUTPUTS = (
    TensorSpec("class_ids", "INT64", (-1, -1)), TensorSpec("class_names", "BYTES", (-1, -1)),
    TensorSpec("probabilities", "FP32", (-1, -1)),
)


def config(metadata: Mapping[str, str], options: Mapping[str, Any], input_shape: Sequence[int],
           output_shape: Sequence[int], where: str) -> dict[str, Any] | None:
    """The ``vision`` manifest option of an ONNX model, or None when it is neither a detector nor a
    classifier. Options (``task``, ``classes``, ``imgsz``, ``stride``, ``layout``) win over metadata."""
    asked = str(options.get("task") or "")
    task = asked or str(metadata.get("task") or "")
    if not task or task == "none" or (not asked and task not in TASKS):
        return None  # an Ultralytics segment/pose/obb export packs as a plain tensor model
    if task not in TASKS:
        raise FrameworkError(f"{where}: task {task!r} is not supported; use --task {'|'.join(TASKS)}")
    names = _names(options.get("classes"), metadata.get("names"), where)
    imgsz = _imgsz(options.get("imgsz") or _literal(metadata.get("imgsz")), input_shape, where)
    try:
        stride = int(options.get("stride") or metadata.get("stride") or 32)
    except ValueError:
        raise FrameworkError(f"{where}: stride {options.get('stride') or metadata.get('stride')!r} "
                             "is not an integer") from None
    if len(input_shape) == 4 and input_shape[2] > 0 and input_shape[3] > 0 and \
            [int(input_shape[2]), int(input_shape[3])] != imgsz:
        raise FrameworkError(f"{where}: --imgsz {imgsz[0]},{imgsz[1]} does not fit the model's input "
                             f"{list(input_shape)}")
    cfg: dict[str, Any] = {"task": task, "names": names, "imgsz": imgsz, "stride": stride}
    if task == "detect":
        layout = str(options.get("layout") or "")
        if not layout and str(metadata.get("end2end", "")).lower() == "true":
            layout = "end2end"
        if not layout:
            layout = guess_layout(tuple(int(d) for d in output_shape), len(names) if names else None)
        if layout not in LAYOUTS:
            raise FrameworkError(f"{where}: layout {layout!r} unknown; known: {', '.join(LAYOUTS)}")
        cfg["layout"] = layout
    return cfg


def signature(cfg: Mapping[str, Any]) -> Signature:
    outputs = DETECT_OUTPUTS if cfg["task"] == "detect" else CLASSIFY_OUTPUTS
    params = {"task": cfg["task"], "class_labels": list(cfg["names"]), "imgsz": list(cfg["imgsz"])}
    return Signature((TensorSpec(INPUT, "BYTES", (-1,)),), outputs, params)


def _literal(text: str | None) -> Any:
    if not text:
        return None
    try:
        return ast.literal_eval(text)  # Ultralytics writes Python literals; never eval
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _names(classes_file: Any, meta_names: str | None, where: str) -> list[str]:
    if classes_file:
        path = Path(str(classes_file))
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise FrameworkError(f"--classes {path}: cannot read it: {exc}") from None
        return [ln.strip() for ln in lines if ln.strip()]
    parsed = _literal(meta_names)
    if parsed is None:
        return []
    if isinstance(parsed, dict) and all(isinstance(k, int) for k in parsed):
        top = max(parsed, default=-1)
        return [str(parsed.get(i, i)) for i in range(top + 1)]
    if isinstance(parsed, (list, tuple)):
        return [str(n) for n in parsed]
    raise FrameworkError(f"{where}: metadata 'names' is not a dict of class index to name")


def _imgsz(value: Any, input_shape: Sequence[int], where: str) -> list[int]:
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise FrameworkError(f"--imgsz {value!r}: expected N or H,W") from None
    if isinstance(value, int):
        value = [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = [value[0], value[0]]
    if not value and len(input_shape) == 4 and input_shape[2] > 0 and input_shape[3] > 0:
        value = [int(input_shape[2]), int(input_shape[3])]
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise FrameworkError(f"{where}: the input size is unknown; pass --imgsz N (or H,W)")
    return [int(value[0]), int(value[1])]


class Pipeline:
    """Images in, detections or top-k classes out, around one ``run`` of the model.

    ``params`` holds each image's request parameters; consecutive images sharing one dict object
    are one request (the server merges requests into one batch after letterboxing, see
    ``split_outputs``), so limits and image numbers in errors are per request."""

    def __init__(self, cfg: Mapping[str, Any], run: Run, *, free_hw: bool = False, free_batch: bool = False,
                 max_pixels: int | None = None, max_images: int | None = None, top_k: int | None = None) -> None:
        self.task = str(cfg["task"])
        self.names = [str(n) for n in cfg.get("names") or ()]
        self.size = (int(cfg["imgsz"][0]), int(cfg["imgsz"][1]))
        self.stride = int(cfg.get("stride") or 32)
        self.layout = str(cfg.get("layout") or "")
        self.run = run
        self.auto = free_hw  # a model with free height/width takes minimal (stride) padding
        self.free_batch = free_batch  # the model takes several images in one run
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.max_images = max_images or DEFAULT_MAX_IMAGES
        self.top_k = top_k or DEFAULT_TOP_K

    def __call__(self, images: Array, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Array]:
        items = images.reshape(-1).tolist()
        per_image = [params] * len(items) if isinstance(params, Mapping) else list(params)
        if len(per_image) != len(items):
            per_image = [per_image[0] if per_image else {}] * len(items)
        starts = [0] * len(items)  # where each image's request starts
        for start, end in requests(per_image):
            if end - start > self.max_images:
                raise InvalidRequestError(f"{end - start} images in one request; the limit is {self.max_images}")
            starts[start:end] = [start] * (end - start)
        decoded = [decode(unwrap(b if isinstance(b, bytes) else bytes(b)), self.max_pixels, f"images[{i - s}]")
                   for i, (b, s) in enumerate(zip(items, starts, strict=True))]
        if self.task == "classify":
            return self._classify(decoded, per_image)
        out = self._detect(decoded, _per_request(per_image, lambda p: request_options(p, len(self.names))))
        wanted = _per_request(per_image, lambda p: _flag(p, "annotate"))
        if any(wanted):
            out["annotated"] = self._annotate(decoded, out, wanted)
        return out

    def records(self, out: Mapping[str, Array], rows: int) -> tuple[dict[str, Array], Array] | None:
        """Detections as records: one per detection (x1, y1, x2, y2, score, class_id, class_name) and
        the image each came from. Classification keeps one row per image (None)."""
        if self.task != "detect":
            return None
        boxes = out["boxes"].reshape(-1, 4)
        cols = {"x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
                "score": out["scores"], "class_id": out["class_ids"], "class_name": out["class_names"]}
        return cols, np.repeat(np.arange(rows), out["detections"])

    def _annotate(self, decoded: list[Array], out: Mapping[str, Array], wanted: Sequence[bool]) -> Array:
        from modelpod.vision.draw import annotate

        pngs = np.empty(len(decoded), dtype=object)
        start = 0
        for i, (img, n) in enumerate(zip(decoded, out["detections"].tolist(), strict=True)):
            rows = slice(start, start + n)
            pngs[i] = base64.b64encode(annotate(img, out["boxes"][rows], out["class_ids"][rows], out["scores"][rows],
                                                self.names)) if wanted[i] else b""
            start += n
        return pngs

    def _detect(self, decoded: list[Array], opts: Sequence[Options]) -> dict[str, Array]:
        boxes, scores, ids, counts = [], [], [], []
        boxed = [letterbox(img, self.size, self.stride, auto=self.auto) for img in decoded]
        if self.free_batch and not self.auto and boxed:  # one size: every image in one run
            preds = list(self.run(to_tensor([p for p, _ in boxed])))
        else:  # one run per image (a fixed batch of 1, or sizes that differ with free height/width)
            preds = [self.run(to_tensor([p]))[0] for p, _ in boxed]
        for pred, (_, lb), opt in zip(preds, boxed, opts, strict=True):
            b, s, c = detect(pred, self.layout, opt)
            boxes.append(to_original(b, lb))
            scores.append(s.astype(np.float32))
            ids.append(c.astype(np.int64))
            counts.append(len(s))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        return {
            "boxes": np.concatenate(boxes).reshape(-1, 4) if boxes else np.zeros((0, 4), np.float32),
            "scores": np.concatenate(scores) if scores else np.zeros(0, np.float32),
            "class_ids": all_ids,
            "class_names": self._labels(all_ids),
            "detections": np.asarray(counts, dtype=np.int64),
        }

    def _classify(self, decoded: list[Array], params: Sequence[Mapping[str, Any]]) -> dict[str, Array]:
        ks = _per_request(params, lambda p: _int_param(p, "top_k", self.top_k, 1, 1000))
        crops = [center_crop(img, self.size[0]) for img in decoded]
        groups = [crops] if self.free_batch else [[c] for c in crops]  # one run, or one per image
        probs = np.concatenate([np.asarray(self.run(to_tensor(g)), dtype=np.float64).reshape(len(g), -1)
                                for g in groups])
        if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            e = np.exp(probs - probs.max(axis=1, keepdims=True))  # logits: softmax them
            probs = e / e.sum(axis=1, keepdims=True)
        k = min(max(ks, default=self.top_k), probs.shape[1])  # split() trims each request to its own
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return {
            "class_ids": top.astype(np.int64),
            "class_names": self._labels(top.reshape(-1)).reshape(top.shape),
            "probabilities": np.take_along_axis(probs, top, axis=1).astype(np.float32),
        }

    def _labels(self, ids: Array) -> Array:
        out = np.empty(len(ids), dtype=object)
        out[:] = [(self.names[i] if 0 <= i < len(self.names) else str(i)).encode() for i in ids.tolist()]
        return out


Split = Callable[[Mapping[str, Array], Sequence[Mapping[str, Array]]], list[dict[str, Array]]]


def splitter(options: Mapping[str, Any]) -> Split | None:
    """The cut of a merged batch's outputs per request for a pod with manifest ``options``, or None
    for a pod that is not a detector or classifier. Needs no model: a server whose replica processes
    run the model cuts their answers with it."""
    cfg = options.get("vision")
    if not isinstance(cfg, Mapping) or "task" not in cfg:
        return None
    try:
        top_k = int(options.get("top_k") or DEFAULT_TOP_K)
    except (TypeError, ValueError):
        top_k = DEFAULT_TOP_K  # the model's load refuses the option: no batch ever comes back
    return partial(split_outputs, str(cfg["task"]), top_k)


def split_outputs(task: str, top_k: int, out: Mapping[str, Array],
                  parts: Sequence[Mapping[str, Array]]) -> list[dict[str, Array]]:
    """The outputs of a merged batch cut back per request: ``parts`` are the requests' inputs (their
    images and parameters), in batch order. Detections go by ``detections`` (per image), top-k rows
    by image, trimmed to each request's ``top_k``."""
    result: list[dict[str, Array]] = []
    first = 0
    counts = out["detections"] if task == "detect" else None
    ends = np.cumsum(counts) if counts is not None else None
    for part in parts:
        rows, params = int(part[INPUT].size), parameters_of(part)
        last = first + rows
        if counts is not None and ends is not None:
            lo = int(ends[first - 1]) if first else 0
            hi = int(ends[last - 1]) if last else 0
            mine = {k: out[k][lo:hi] for k in ("boxes", "scores", "class_ids", "class_names")}
            mine["detections"] = out["detections"][first:last]
            if "annotated" in out and _flag(params, "annotate"):
                mine["annotated"] = out["annotated"][first:last]
        else:
            k = min(_int_param(params, "top_k", top_k, 1, 1000), out["class_ids"].shape[1])
            mine = {n: out[n][first:last, :k] for n in ("class_ids", "class_names", "probabilities")}
        result.append(mine)
        first = last
    return result


def requests(params: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """[start, end) of each run of images sharing one parameters object: one request each."""
    bounds: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(params) + 1):
        if i == len(params) or params[i] is not params[start]:
            bounds.append((start, i))
            start = i
    return bounds


def _per_request(params: Sequence[Mapping[str, Any]], read: Callable[[Mapping[str, Any]], _T]) -> list[_T]:
    """``read`` of each image's parameters, read once per request (a bad value: 400)."""
    out: list[_T] = []
    for start, end in requests(params):
        out.extend([read(params[start])] * (end - start))
    return out


def request_options(parameters: Mapping[str, Any], nc: int) -> Options:
    """``conf``, ``iou``, ``max_det`` and ``classes`` from a request's parameters (400 when bad)."""
    base = Options()
    conf = _float_param(parameters, "conf", base.conf)
    iou = _float_param(parameters, "iou", base.iou)
    max_det = _int_param(parameters, "max_det", base.max_det, 1, 10000)
    raw: Any = parameters.get("classes")
    classes: tuple[int, ...] | None = None
    if raw is not None:
        if isinstance(raw, str):
            raw = [p for p in raw.split(",") if p.strip()]
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = [raw]
        try:
            classes = tuple(int(c) for c in raw)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"parameter 'classes' {raw!r}: expected class ids, e.g. [0, 2]") from None
    return Options(conf, iou, max_det, classes)


def _flag(parameters: Mapping[str, Any], key: str) -> bool:
    value = parameters.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", ""):
        return value.lower() in ("true", "1")
    raise InvalidRequestError(f"parameter {key!r} {value!r}: expected true or false")


def _float_param(parameters: Mapping[str, Any], key: str, default: float) -> float:
    value = parameters.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"parameter {key!r} {value!r}: expected a number in [0, 1]") from None
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise InvalidRequestError(f"parameter {key!r} {value!r}: expected a number in [0, 1]")
    return number


def _int_param(parameters: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = parameters.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"parameter {key!r} {value!r}: expected an integer") from None
    if isinstance(value, bool) or (isinstance(value, float) and value != number) or not low <= number <= high:
        raise InvalidRequestError(f"parameter {key!r} {value!r}: expected an integer in [{low}, {high}]")
    return number
