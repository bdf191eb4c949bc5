"""pack: model file(s) -> Pod in the store (detect framework, infer signature, lock requirements)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from modelpod import __version__, table
from modelpod.errors import ModelpodError, PodError, SignatureError, UsageError
from modelpod.frameworks import Adapter, PackRequest, detect, require
from modelpod.frameworks._util import MODEL_DIR
from modelpod.pod import Manifest, Pod, Serving, Signature, TensorSpec, scan_files
from modelpod.store import PodRecord, Store

CORE_DISTRIBUTIONS = ("numpy",)
_MAX_PROBES = 8


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
    auto_lock: bool = True,
    created: int | None = None,
    encrypt: str | Path | None = None,
) -> PodRecord:
    """Pack a model file or directory into a new pod version in ``store``.

    ``trust``: type names (``module.Class``, a list or one comma-separated string) to trust in a
    skops file beyond skops' and modelpod's own lists; recorded in the manifest.

    The lock is the automatic one (what loading and predicting the sample imports, the adapter's
    distributions, a custom pod's own requirements.txt / pyproject.toml) plus ``requirements``;
    with ``auto_lock=False`` it is ``requirements`` alone. ``created`` (seconds since the epoch,
    default now) is recorded in the lineage; images built from the pod carry it as their time.
    """
    src = Path(path)
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    key = None
    if encrypt is not None:  # read (and checked) before any work
        from modelpod.trust.encryption import read_key

        key = read_key(encrypt)
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
            trust=trusted,
            outputs=tuple(outputs.split(",") if isinstance(outputs, str) else outputs or ()),
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
            entrypoint=packed.entrypoint,
            serving=Serving.from_dict({**_default_serving(), **dict(packed.serving), **dict(serving or {})}),
            labels=dict(labels or {}),
            lineage=_lineage(parent_digest, source or str(src.resolve()), metrics,
                             int(time.time()) if created is None else created),
            allow_pickle=allow_pickle,
            trust=packed.trust,
            options={**dict(packed.options), **dict(options or {})},
            modelpod_version=__version__,
        )
        manifest = _complete_signature(adapter, staging, manifest, sample)
        manifest = _keep_sample(adapter, staging, manifest, sample)
        manifest = replace(manifest, requirements=tuple(
            lock_pod(staging, manifest, (*adapter.DISTRIBUTIONS, *packed.distributions),
                     Path(requirements) if requirements else None, auto=auto_lock)))
        if key is not None:  # the weights are encrypted in staging: only ciphertext reaches the store
            from modelpod.trust.encryption import encrypt_dir

            manifest = encrypt_dir(staging, manifest, key)
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


def _lineage(parent: str | None, source: str, metrics: Mapping[str, float] | None, created: int) -> dict[str, Any]:
    # created: seconds since the epoch when packed; built images take their time from it.
    lineage = {"parent": parent, "source": source, "metrics": dict(metrics or {}), "created": created}
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
def lock_pod(staging: Path, manifest: Manifest, distributions: Sequence[str], requirements: Path | None,
             *, auto: bool = True) -> list[str]:
    """The pod's locked requirements (see ``pack``)."""
    from modelpod import locking, probe

    locks: list[Mapping[str, str]] = []
    if auto:
        if manifest.framework == "python":  # a code directory may say what it needs
            for name in ("requirements.txt", "pyproject.toml"):
                declared = staging / MODEL_DIR / name
                if declared.is_file():
                    locks.append(locking.lock_file(declared))
        lock = locking.walk([*CORE_DISTRIBUTIONS, *distributions])
        for _ in range(_MAX_PROBES):  # add the distribution of each module loading and predicting miss
            allowed = {name for found in (lock, *locks) for name in found}
            result = probe.run(staging, manifest, allow=allowed)
            wanted = locking.owners(result.missing) - allowed if result.missing else set()
            if result.ok or not wanted:
                break
            lock = {**lock, **locking.walk(sorted(wanted))}
        locks.insert(0, lock)
    if requirements is not None:
        locks.append(locking.lock_file(requirements))
    return locking.merge(*locks)


def _keep_sample(adapter: Adapter, staging: Path, manifest: Manifest, sample: Any) -> Manifest:
    """The first rows of the sample as ``sample.json`` in the pod, for the image's load check."""
    from modelpod.probe import write_sample

    if sample is None:
        return manifest
    entry = write_sample(staging, sample_inputs(sample, manifest.signature))
    return manifest if entry is None else replace(manifest, files=(*manifest.files, entry))
