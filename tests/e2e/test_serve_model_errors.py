"""Model errors caused by the client's input are 400 / INVALID_ARGUMENT with a short reason.

Real models, packed here from synthetic data, served by ``modelpod serve``, called over REST and
with tritonclient's gRPC client:
a torch embedding asked for an index it does not have (TorchScript and torch.export), and a
multi-input scikit-learn model sent columns of different lengths. Neither answer may carry a
traceback or a server path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import ServeProcess, modelpod_serve

from modelpod.api import pack
from modelpod.pod import datatype_of
from modelpod.store import Store

pytestmark = pytest.mark.e2e
torch = pytest.importorskip("torch")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


class Bag(torch.nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).sum(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    import pandas as pd
    import skops.io as sio
    from sklearn.linear_model import LinearRegression

    d = tmp_path_factory.mktemp("models")
    store = Store(d / "home")
    torch.manual_seed(0)
    net = Bag().eval()
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    torch.jit.save(torch.jit.script(net), str(d / "bag.pt"))
    np.save(d / "ids.npy", ids)
    pack(d / "bag.pt", "bag", store=store, sample=d / "ids.npy")
    program = torch.export.export(net, (torch.from_numpy(ids),),
                                  dynamic_shapes={"ids": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(d / "bag.pt2"))
    pack(d / "bag.pt2", "bagx", store=store)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=50), "b": rng.normal(size=50)})
    sio.dump(LinearRegression().fit(frame, frame["a"] * 2 - frame["b"]), d / "cols.skops")
    pack(d / "cols.skops", "cols", store=store, sample={"a": frame["a"].to_numpy()[:4], "b": frame["b"].to_numpy()[:4]})

    with modelpod_serve(store.home, "bag", "bagx", "cols", "--grpc-port", "0") as proc:
        yield proc


def no_internals(message: str) -> None:
    assert "Traceback" not in message and "site-packages" not in message and "/" not in message, message


def infer(url: str, model: str, tensors: dict[str, np.ndarray[Any, Any]]) -> httpx.Response:
    body = {"inputs": [{"name": k, "datatype": datatype_of(v), "shape": list(v.shape), "data": v.reshape(-1).tolist()}
                       for k, v in tensors.items()]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)


@pytest.mark.parametrize("model", ["bag", "bagx"])
def test_a_bad_embedding_index_is_a_400(server: ServeProcess, model: str) -> None:
    name = "input-0" if model == "bag" else "ids"
    r = infer(server.url, model, {name: np.array([[1, 2, 3]], dtype=np.int64)})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 4]
    bad = np.array([[1, 2, 99]], dtype=np.int64)
    r = infer(server.url, model, {name: bad})
    assert r.status_code == 400 and "index out of range" in r.json()["error"], r.text
    no_internals(r.json()["error"])
    assert server.grpc is not None
    grpc = grpcclient.InferenceServerClient(server.grpc)
    try:
        ginp = grpcclient.InferInput(name, list(bad.shape), "INT64")
        ginp.set_data_from_numpy(bad)
        with pytest.raises(InferenceServerException) as info:
            grpc.infer(model, [ginp])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "index out of range" in info.value.message()
        no_internals(info.value.message())
    finally:
        grpc.close()


def test_columns_of_different_lengths_are_a_400(server: ServeProcess) -> None:
    r = infer(server.url, "cols", {"a": np.arange(3, dtype=np.float64), "b": np.arange(2, dtype=np.float64)})
    assert r.status_code == 400 and "same length" in r.json()["error"], r.text
    no_internals(r.json()["error"])
    r = infer(server.url, "cols", {"a": np.arange(3, dtype=np.float64), "b": np.arange(3, dtype=np.float64)})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [3], r.text
    assert server.grpc is not None
    grpc = grpcclient.InferenceServerClient(server.grpc)
    try:
        inputs = []
        for col, n in (("a", 3), ("b", 2)):
            inp = grpcclient.InferInput(col, [n], "FP64")
            inp.set_data_from_numpy(np.arange(n, dtype=np.float64))
            inputs.append(inp)
        with pytest.raises(InferenceServerException) as info:
            grpc.infer("cols", inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "same length" in info.value.message()
    finally:
        grpc.close()
