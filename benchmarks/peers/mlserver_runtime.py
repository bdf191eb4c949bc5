"""Seldon MLServer custom runtime for the TorchScript MLP (workload B).

Workload A uses MLServer's stock `mlserver_sklearn.SKLearnModel`; the harness writes the
settings.json / model-settings.json (ports, adaptive batching) next to the run.
"""

from __future__ import annotations

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, NumpyRequestCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class TorchScriptModel(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(1)
        uri = await get_model_uri(self._settings, wellknown_filenames=["model.pt"])
        self._module = torch.jit.load(uri).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = self.decode_request(payload, default_codec=NumpyRequestCodec)
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.inference_mode():
            y = self._module(batch).numpy()
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name="output-0", payload=y)],
        )
