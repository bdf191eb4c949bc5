"""pack: model file(s) -> Pod in the store (detect framework, infer signature, lock requirements)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from modelpod import __version__, table
from modelpod.errors import ModelpodError, PodError, SignatureError, UsageError
from modelpod.frameworks import Adapter, PackRequest, detect, require
from modelpod.pod import Manifest, Pod, Serving, Signature, TensorSpec, scan_files
from modelpod.store import PodRecord, Store

CORE_DISTRIBUTIONS = ("numpy",)


def pack(
    path: str | Path,
    name: str,
    store: Store,
    *,
    framework: str | None = None,
    sample: str | Path | Mapping[str, Any] | np.ndarray[Any, Any] | Any | None = None,
    requirements: str | Path | None = None,
    labels: Mapping[str, str] | None = None,
    parent: str | None = None,
    allow_pickle: bool = False,
    trust: str | Sequence[str] | None = None,
    entrypoint: str | None = None,
    options: Mapping[str, Any] | None = None,
    serving: Mapping[str, Any] | None = None,
    source: str | None = None,
    metrics: Mapping[str, float] | None = None,
    outputs: Sequence[str] | str | None = None,
) -> PodRecord:
    """Pack a model file or directory into a new pod version in ``store``.

    ``trust``: type names (``module.Class``, a list or one comma-separated string) to trust in a
    skops file beyond skops' and modelpod's own lists; recorded in the manifest."""
    src = Path(path)
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    fw = framework or detect(src)
    adapter = require(fw)
    trusted = trust_names(trust)
    if trusted and not adapter.TAKES_TRUST:
        raise UsageError(f"--trust is for skops files (scikit-learn); a {fw} model has nothing to trust")
    Manifest(name=name, framework=fw, files=())  # validates the name before any work
    parent_digest = store.get(parent).digest if parent else None
    staging = store.staging()
    try:
        request = PackRequest(
            name=name, allow_pickle=allow_pickle, entrypoint=entrypoint, options=dict(options or {}),
            outputs=tuple(outputs.split(",") if isinstance(outputs, str) else outputs or ()),
            trust=trusted,
        )
        packed = adapter.pack(src, staging, request)
        if request.outputs and "outputs" not in packed.options:
            raise UsageError(f"--outputs is not supported for {fw} pods: they answer the model's own outputs "
                             "(see docs/models.md); a request can ask for some of them with OIP 'outputs'")
        files = scan_files(staging, packed.roles)
        if not files:
            raise PodError(f"{src}: nothing to pack")
        manifest = Manifest(
            name=name,
            framework=fw,
            files=tuple(files),
            signature=packed.signature or Signature(),
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
            requirements=tuple(
                lock_requirements(requirements)
                if requirements
                else lock_installed((*CORE_DISTRIBUTIONS, *adapter.DISTRIBUTIONS, *packed.distributions))
            ),
            entrypoint=packed.entrypoint,
            serving=Serving.from_dict({**_default_serving(), **dict(packed.serving), **dict(serving or {})}),
            labels=dict(labels or {}),
            lineage=_lineage(parent_digest, source or str(src.resolve()), metrics),
            allow_pickle=allow_pickle,
            trust=packed.trust,
            options={**dict(packed.options), **dict(options or {})},
            modelpod_version=__version__,
        )
        manifest = _complete_signature(adapter, staging, manifest, sample)
        return store.add(staging, manifest)
    except ModelpodError:
        raise
    except (ValueError, TypeError, OSError, RuntimeError, KeyError) as exc:
        raise PodError(f"{src}: cannot pack as {fw}: {type(exc).__name__}: {exc}") from exc
    finally:
        store.discard(staging)


_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def trust_names(trust: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--trust`` values as a sorted tuple of full type names (``module.Class``)."""
    items = [trust] if isinstance(trust, str) else list(trust or ())
    names = {n.strip() for item in items for n in str(item).split(",") if n.strip()}
    for n in sorted(names):
        if not _TYPE_NAME.fullmatch(n):
            raise UsageError(f"--trust {n!r}: give full type names, e.g. sklearn.tree._tree.Tree")
    return tuple(sorted(names))


def _lineage(parent: str | None, source: str, metrics: Mapping[str, float] | None) -> dict[str, Any]:
    lineage = {"parent": parent, "source": source, "metrics": dict(metrics or {})}
    return {k: v for k, v in lineage.items() if v}


def _default_serving() -> dict[str, Any]:
    return {"max_batch_rows": 32, "max_batch_wait_ms": 2.0}


def _complete_signature(adapter: Adapter, staging: Path, manifest: Manifest, sample: Any) -> Manifest:
    """Fill in the signature from ``sample`` and check that the model accepts it."""
    sig = manifest.signature
    if sample is None:
        if not sig.inputs:
            raise SignatureError(
                f"cannot infer the signature of this {manifest.framework} model; pass --sample FILE "
                "(.npy for one input; .npz, .csv, .parquet, .jsonl or an OIP JSON request for several)"
            )
        return manifest
    sig, arrays = _sample_arrays(adapter, sig, sample)
    if sig.inputs:
        for n, a in arrays.items():
            spec = sig.input(n)
            if spec is None:
                raise SignatureError(f"sample has input {n!r}; the model's inputs are {[t.name for t in sig.inputs]}")
            if not spec.accepts_shape(a.shape):
                raise SignatureError(
                    f"sample input {n!r} has shape {list(a.shape)}; the model wants {list(spec.shape)}"
                )
    inputs = sig.inputs or Signature.infer(arrays).inputs
    pod = Pod(staging, replace(manifest, signature=Signature(inputs, sig.outputs, sig.parameters)))
    model = adapter.load(pod)
    try:
        model.load()
        if sig.is_table and not manifest.signature.inputs:
            # Only the columns the model was trained on, in its order (a sample may hold the target too).
            inputs, arrays = _trained_columns(model, inputs, arrays)
            pod = Pod(staging, replace(pod.manifest, signature=Signature(inputs, sig.outputs, sig.parameters)))
            model.signature = pod.manifest.signature
        out = model.predict(model.coerce(arrays))
        learned = model.model_parameters()
    except ModelpodError:
        raise
    except Exception as exc:  # the user's model or sample: report it as a signature problem
        raise SignatureError(f"the sample does not fit the model: {type(exc).__name__}: {exc}") from exc
    finally:
        model.unload()
    outputs = sig.outputs or tuple(TensorSpec.of(n, np.asarray(a)) for n, a in out.items())
    params = {**learned, **sig.parameters}
    if sig.is_table:
        params = table.only_columns(params, [t.name for t in inputs])
    return replace(manifest, signature=Signature(inputs, outputs, params))


def _trained_columns(model: Any, inputs: tuple[TensorSpec, ...], arrays: dict[str, np.ndarray[Any, Any]]
                     ) -> tuple[tuple[TensorSpec, ...], dict[str, np.ndarray[Any, Any]]]:
    names = model.table_columns()
    if not names:
        return inputs, arrays
    by_name = {t.name: t for t in inputs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SignatureError(f"the sample table lacks column(s) {', '.join(missing)}, which the model was trained on")
    return tuple(by_name[n] for n in names), {n: arrays[n] for n in names}


def _sample_arrays(adapter: Adapter, sig: Signature, sample: Any) -> tuple[Signature, dict[str, np.ndarray[Any, Any]]]:
    """The sample as named arrays, and the signature a table sample gives a model that takes tables."""
    frame: Any = None
    if table.is_frame(sample):
        frame = sample
    elif isinstance(sample, (str, Path)) and table.is_table_file(sample):
        frame = table.read_table(sample)
    elif adapter.TABLES and not sig.inputs:
        arrays = read_sample(sample, [])
        if len(arrays) > 1 and all(a.ndim == 1 for a in arrays.values()):
            frame = table.pandas().DataFrame(arrays)  # named 1-D columns (.npz, a mapping): a table
        else:
            return sig, arrays
    if frame is None:
        return sig, read_sample(sample, [t.name for t in sig.inputs])
    if adapter.TABLES and not sig.inputs:
        tsig = table.frame_signature(frame)
        merged = Signature(tsig.inputs, sig.outputs, {**tsig.parameters, **sig.parameters})
        return merged, table.frame_batch(frame, tsig)
    return sig, table.table_inputs(frame, sig)


def sample_inputs(sample: Any, signature: Signature) -> dict[str, np.ndarray[Any, Any]]:
    """A sample (or ``predict --input``) as a pod's inputs: a table as its columns or one matrix."""
    if table.is_frame(sample) or (isinstance(sample, (str, Path)) and table.is_table_file(sample)):
        frame = sample if table.is_frame(sample) else table.read_table(sample)
        return table.table_inputs(frame, signature)
    return read_sample(sample, [t.name for t in signature.inputs])


def read_sample(sample: Any, input_names: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
    """A sample as named arrays: .npy (one input), .npz, an OIP v2 JSON request, or arrays."""
    default = input_names[0] if len(input_names) == 1 else "input-0"
    if isinstance(sample, Mapping):
        return {str(k): np.asarray(v) for k, v in sample.items()}
    if isinstance(sample, np.ndarray):
        return {default: sample}
    p = Path(sample)
    if not p.is_file():
        raise UsageError(f"sample {p}: no such file")
    try:
        if p.suffix == ".npy":
            return {default: np.load(p, allow_pickle=False)}
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if p.suffix == ".json":
            from modelpod.protocols.codec import decode_request

            return decode_request(json.loads(p.read_text())).inputs
    except (ValueError, OSError) as exc:
        raise SignatureError(f"sample {p}: cannot read: {exc}") from None
    raise UsageError(f"sample {p}: use .npy, .npz, .csv, .parquet, .jsonl or an OIP v2 .json request")


# -- requirements ------------------------------------------------------------------------------
def lock_installed(distributions: Iterable[str]) -> list[str]:
    """Exact versions of ``distributions`` and everything they need, from this environment."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(d, ()) for d in distributions]
    while todo:
        name, extras = todo.pop()
        key = _norm(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if key in seen and not extras:
            continue
        seen[key] = f"{dist.metadata['Name']}=={dist.version}"
        for text in dist.requires or ():
            req = Requirement(text)
            env_extras: list[dict[str, str]] = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in env_extras):
                continue
            if _norm(req.name) not in seen:
                todo.append((req.name, tuple(req.extras)))
    return sorted(seen.values(), key=str.lower)


def lock_requirements(path: str | Path) -> list[str]:
    """Resolve a requirements file to exact versions with pip's resolver (no install)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"requirements file {p}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             "--report", str(report), "-r", str(p)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UsageError(f"cannot resolve {p}: {tail}")
        data = json.loads(report.read_text())
    pins = (f"{i['metadata']['name']}=={i['metadata']['version']}" for i in data.get("install", []))
    return sorted(pins, key=str.lower)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
