"""Model: a loaded model, the one thing the engine, the CLI and batch jobs call.

Framework adapters (``modelpod.frameworks.*``) subclass it. A batch is a mapping from tensor name to
a numpy array whose first dimension is rows; BYTES tensors are numpy object arrays of ``bytes``.
Users subclass it for custom code and may write ``predict`` with typed parameters instead
(see ``modelpod.frameworks.python``): their type hints are then the schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelpod import table
from modelpod.errors import SignatureError
from modelpod.inputs import check_inputs
from modelpod.pod import Pod, Signature

Batch = dict[str, np.ndarray[Any, Any]]

# The batch key under which the engine hands a request's ``parameters`` (a 0-d object array holding
# a dict) to a model whose ``takes_parameters`` is true. A 0-d entry keeps the request out of merged
# batches, so each such request runs with its own parameters. A model whose ``row_parameters`` is
# also true gets them per row instead (a ``[rows]`` object array, every row of a request holding the
# same dict), so requests with different parameters can share a batch.
PARAMETERS = "__parameters__"


def with_parameters(batch: Batch, parameters: Mapping[str, Any], per_row: bool = False) -> Batch:
    """``batch`` plus the request's parameters under ``PARAMETERS`` (one entry per row with ``per_row``)."""
    params = dict(parameters)
    rows = next((int(v.shape[0]) for v in batch.values() if v.ndim > 0), None) if per_row else None
    holder: np.ndarray[Any, Any]
    if rows is None:
        holder = np.empty((), dtype=object)
        holder[()] = params
    else:
        holder = np.empty(rows, dtype=object)
        holder[:] = [params] * rows  # one dict object: a merged batch still tells its requests apart
    return {**batch, PARAMETERS: holder}


def parameters_of(batch: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    """The request parameters ``with_parameters`` put in a batch ({} when none: a direct call)."""
    holder = batch.get(PARAMETERS)
    value = holder[()] if holder is not None and holder.ndim == 0 else (
        holder.flat[0] if holder is not None and holder.size else None)
    return dict(value) if isinstance(value, Mapping) else {}


def row_parameters(batch: Mapping[str, np.ndarray[Any, Any]], rows: int) -> list[Mapping[str, Any]]:
    """The parameters of each of ``rows`` rows: per row as ``with_parameters(per_row=True)`` put them,
    else the request's (or none) for every row. Rows of one request share one dict object."""
    holder = batch.get(PARAMETERS)
    if holder is not None and holder.ndim == 1 and len(holder) == rows:
        return [p if isinstance(p, Mapping) else {} for p in holder.tolist()]
    return [parameters_of(batch)] * rows


class Model:
    """Base class: ``load()``, ``predict(batch) -> batch``, ``unload()``."""

    signature: Signature = Signature()
    takes_parameters: bool = False  # the engine passes request parameters in the batch (``PARAMETERS``)
    row_parameters: bool = False  # ... one entry per row, so requests with different parameters merge
    # predict only computes on its inputs (no I/O, no waiting on anything): a batch it answers fast
    # may run on the server's event loop instead of its thread (serving/worker.py). Custom code may
    # wait on anything, so only the frameworks' own models say so.
    computes_only: bool = False
    # Set before ``load`` in a process replica (``isolation: process``): the cores are shared with the
    # other replicas, so a framework with its own thread pool sizes it for one (docs/replicas.md).
    replica: bool = False

    def __init__(self, pod: Pod | None = None) -> None:
        self.pod = pod
        if pod is not None and not pod.manifest.signature.empty:
            self.signature = pod.manifest.signature
        self.loaded = False

    @property
    def name(self) -> str:
        return self.pod.name if self.pod is not None else type(self).__name__.lower()

    def load(self) -> None:
        """Read weights into memory. Called once before the first predict."""
        self.loaded = True

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def unload(self) -> None:
        """Release memory. The model may be loaded again later."""
        self.loaded = False

    def split_outputs(self, outputs: Batch, parts: Sequence[Batch]) -> list[Batch] | None:
        """The outputs of a merged batch cut back into each request's (``parts``: the requests' inputs,
        in order), for a model whose outputs do not keep one row per input row (a detector's boxes);
        None when they do, and the batcher slices rows."""
        return None

    def records(self, outputs: Batch, rows: int) -> tuple[Batch, np.ndarray[Any, Any]] | None:
        """Batch scoring: the outputs as records (one row each, e.g. one per detection) and the input
        row each record belongs to; None when the outputs keep one row per input row."""
        return None

    def model_parameters(self) -> dict[str, Any]:
        """Model-level metadata a loaded model knows (e.g. ``class_labels``); pack records it."""
        return {}

    def table_columns(self) -> list[str] | None:
        """The columns a loaded table model was trained on, in order, where it knows them."""
        return None

    # -- helpers for callers ----------------------------------------------------------------
    def __call__(self, inputs: Mapping[str, Any] | np.ndarray[Any, Any] | Any) -> Batch:
        """Predict from a mapping of arrays, or a single array for a single-input model."""
        if not self.loaded:
            self.load()
        return self.predict(self.coerce(inputs))

    def coerce(self, inputs: Mapping[str, Any] | np.ndarray[Any, Any] | Any) -> Batch:
        """Turn user input into a batch that fits the signature (the one input check, ``modelpod.inputs``)."""
        sig = self.signature
        if table.is_frame(inputs):
            inputs = table.table_inputs(inputs, sig)  # its columns, or one matrix
        if sig.is_table and isinstance(inputs, Mapping):
            # Also a ``records`` input, [N, 1] columns and missing strings (None).
            return table.TableCheck(sig, self.name).arrays(inputs)
        if not isinstance(inputs, Mapping):
            if len(sig.inputs) != 1:
                raise SignatureError(
                    f"model {self.name!r} takes {len(sig.inputs)} inputs "
                    f"({', '.join(t.name for t in sig.inputs) or 'unknown'}); pass a mapping of name to array"
                )
            inputs = {sig.inputs[0].name: inputs}
        return check_inputs(sig, inputs, model=self.name)
