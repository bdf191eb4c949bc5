"""Tiny models for the adapter tests, made here from synthetic data; and a round-trip checker.

Expensive models are session-scoped; TensorFlow's live in test_tensorflow.py (module-scoped) so
that only that module pays for importing TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fwutil import VOCAB, Arrays, Check, Evil, features

import modelpod
from modelpod.archive import export, import_archive
from modelpod.store import PodRecord, Store


@pytest.fixture
def check_pod(store: Store, tmp_path: Path) -> Check:
    """Verify a stored pod, export and re-import it elsewhere, load it, and compare predictions."""

    def check(rec: PodRecord, inputs: Any, expected: Arrays, rtol: float = 1e-5, atol: float = 1e-6
              ) -> dict[str, np.ndarray]:
        pod = store.open(rec.ref, verify=True)
        assert list(pod.problems()) == []
        tar = tmp_path / f"{rec.name}-{rec.version}.tar"
        export(pod, tar)
        other = Store(tmp_path / "imported")
        again = import_archive(tar, other)
        assert again.digest == rec.digest
        model = modelpod.load(again.ref, store=other)
        try:
            out = model(inputs)
        finally:
            model.unload()
        assert set(expected) <= set(out), f"outputs {sorted(out)}, expected {sorted(expected)}"
        for name, want in expected.items():
            got = out[name]
            if np.asarray(want).dtype.kind in "OUS":
                assert [bytes(v) for v in got.reshape(-1)] == [
                    v.encode() if isinstance(v, str) else bytes(v) for v in np.asarray(want).reshape(-1)]
            else:
                np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
        return out

    return check


@pytest.fixture(scope="session")
def xgb_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Any]:
    """A binary XGBoost booster saved as model.json and model.ubj; (dir, sample, booster)."""
    import xgboost as xgb

    x, y = features()
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1},
                        xgb.DMatrix(x, label=y), num_boost_round=5)
    d = tmp_path_factory.mktemp("xgb")
    booster.save_model(str(d / "model.json"))
    booster.save_model(str(d / "model.ubj"))
    return d, x[:7], booster


@pytest.fixture(scope="session")
def lgb_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Any]:
    import lightgbm as lgb

    x, y = features()
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "num_threads": 1},
                        lgb.Dataset(x, label=y), num_boost_round=5)
    path = tmp_path_factory.mktemp("lgb") / "model.txt"
    booster.save_model(str(path))
    return path, x[:7], booster


# -- ONNX and PyTorch ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def skl2onnx_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Any]:
    """A LogisticRegression converted by skl2onnx (no ZipMap); (path, sample, estimator)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    x, y = features()
    est = LogisticRegression().fit(x, y)
    onx = to_onnx(est, initial_types=[("features", FloatTensorType([None, 5]))],
                  options={id(est): {"zipmap": False}}, target_opset=17)
    path = tmp_path_factory.mktemp("onnx") / "lr.onnx"
    path.write_bytes(onx.SerializeToString())
    return path, x[:7], est

@pytest.fixture(scope="session")
def torch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One seeded MLP saved every way torch saves: TorchScript, torch.export, torch.save."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
    d = tmp_path_factory.mktemp("torch")
    torch.jit.save(torch.jit.script(net), str(d / "script.pt"))
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.from_numpy(x),), dynamic_shapes={"input": {0: batch}})
    torch.export.save(program, str(d / "program.pt2"))
    torch.save(net, d / "module.pt")
    torch.save(net.state_dict(), d / "state.pt")
    torch.save({"weights": torch.ones(2), "payload": Evil()}, d / "evil.pt")
    np.save(d / "sample.npy", x)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    return {"dir": d, "x": x, "expected": expected, "net": net}


# -- transformers ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random BERTs: a classifier (safetensors), an encoder, and a classifier in .bin."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("hf")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(vocab))
    config = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    cls_cfg = BertConfig(**config, num_labels=2, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    classifier = BertForSequenceClassification(cls_cfg).eval()
    encoder = BertModel(BertConfig(**config), add_pooling_layer=False).eval()
    out = {"cls": root / "cls", "enc": root / "enc", "bin": root / "bin"}
    classifier.save_pretrained(out["cls"])
    encoder.save_pretrained(out["enc"])
    classifier.save_pretrained(out["bin"])
    for d in out.values():
        tokenizer.save_pretrained(d)
    # The legacy layout, written by hand (transformers 5 saves only safetensors): a pickled state dict.
    (out["bin"] / "model.safetensors").unlink()
    torch.save(classifier.state_dict(), out["bin"] / "pytorch_model.bin")
    return out
