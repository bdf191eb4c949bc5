"""Model: a loaded model, the one thing the engine, the CLI and batch jobs call.

Framework adapters (``modelpod.frameworks.*``) subclass it. A batch is a mapping from tensor name to
a numpy array whose first dimension is rows; BYTES tensors are numpy object arrays of ``bytes``.
Users subclass it for custom code and may write ``predict`` with typed parameters instead
(see ``modelpod.frameworks.python``): their type hints are then the schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from modelpod import table
from modelpod.errors import SignatureError
from modelpod.inputs import check_inputs
from modelpod.pod import Pod, Signature

Batch = dict[str, np.ndarray[Any, Any]]


class Model:
    """Base class: ``load()``, ``predict(batch) -> batch``, ``unload()``."""

    signature: Signature = Signature()

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
