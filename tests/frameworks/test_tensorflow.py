"""TensorFlow and Keras: one module so that TensorFlow is imported once (it is slow to import)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fwutil import Check, assert_store_empty, sig

from modelpod.cli import main
from modelpod.errors import FrameworkError, UnsafeModelError
from modelpod.frameworks import detect
from modelpod.frameworks import tensorflow as adapter
from modelpod.packing import pack
from modelpod.pod import Pod
from modelpod.store import Store

X = np.random.default_rng(4).normal(size=(5, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def tf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    d = tmp_path_factory.mktemp("tf")
    keras.utils.set_random_seed(0)

    class Scorer(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.arange(12, dtype=np.float32).reshape(4, 3) / 10)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, features: Any) -> dict[str, Any]:
            return {"scores": tf.matmul(features, self.w), "best": tf.argmax(tf.matmul(features, self.w), axis=1)}

    scorer = Scorer()
    tf.saved_model.save(scorer, str(d / "saved"), signatures={"serving_default": scorer.serve})
    saved_expected = {k: v.numpy() for k, v in scorer.serve(tf.constant(X)).items()}

    inp = keras.Input((4,), name="x")
    functional = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Dense(8, activation="relu")(inp)))
    functional.save(d / "functional.keras")

    named = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="prob")(inp))
    named.save(d / "named.keras")

    lam = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Lambda(lambda v: v * 2, name="double"),
                            keras.layers.Dense(1)])
    lam.save(d / "lambda.keras")
    np.save(d / "sample.npy", X)
    return {
        "dir": d, "saved": saved_expected,
        "functional": np.asarray(functional.predict_on_batch(X)), "lambda": np.asarray(lam.predict_on_batch(X)),
        "named": np.asarray(named.predict_on_batch(X)),
    }


def test_saved_model_signature_from_serving_default(store: Store, check_pod: Check, capsys: pytest.CaptureFixture[str],
                                                    tf_models: dict[str, Any]) -> None:
    d = tf_models["dir"] / "saved"
    assert detect(d) == "tensorflow"
    code = main(["--home", str(store.home), "pack", str(d), "--name", "scorer", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["framework"] == "tensorflow"
    rec = store.get("scorer")
    assert sig(rec) == {
        "inputs": [("features", "FP32", [-1, 4])],
        "outputs": [("best", "INT64", [-1]), ("scores", "FP32", [-1, 3])],
    }
    check_pod(rec, X, tf_models["saved"])


def test_unknown_signature_key(store: Store, tf_models: dict[str, Any]) -> None:
    with pytest.raises(FrameworkError, match="no signature 'predict'.*serving_default"):
        pack(tf_models["dir"] / "saved", "scorer", store, options={"signature": "predict"})
    assert_store_empty(store)


def test_keras_file(store: Store, check_pod: Check, tf_models: dict[str, Any]) -> None:
    path = tf_models["dir"] / "functional.keras"
    assert detect(path) == "tensorflow"
    rec = pack(path, "dense", store)  # input specs give the signature
    assert sig(rec) == {"inputs": [("x", "FP32", [-1, 4])], "outputs": [("output-0", "FP32", [-1, 2])]}
    check_pod(rec, X, {"output-0": tf_models["functional"]})


def test_keras_output_layer_names_are_the_output_names(store: Store, check_pod: Check,
                                                       tf_models: dict[str, Any]) -> None:
    rec = pack(tf_models["dir"] / "named.keras", "named", store)
    assert sig(rec)["outputs"] == [("prob", "FP32", [-1, 3])]  # the layer's name, not output-0
    check_pod(rec, X, {"prob": tf_models["named"]})


def test_keras_lambda_refused_without_opt_in(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             tf_models: dict[str, Any]) -> None:
    home = tmp_path / "home"
    code = main(["--home", str(home), "pack", str(tf_models["dir"] / "lambda.keras"), "--name", "lam"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "Lambda double" in err and "--allow-pickle" in err
    assert_store_empty(Store(home))


def test_keras_lambda_with_opt_in(store: Store, check_pod: Check, tf_models: dict[str, Any]) -> None:
    rec = pack(tf_models["dir"] / "lambda.keras", "lam", store, allow_pickle=True)
    assert rec.manifest.allow_pickle
    check_pod(rec, X, {"output-0": tf_models["lambda"]})
    pod = store.open(rec.ref)
    model = adapter.load(Pod(pod.path, replace(pod.manifest, allow_pickle=False)))
    with pytest.raises(UnsafeModelError, match="Lambda"):
        model.load()


def test_safe_mode_is_the_backstop(tf_models: dict[str, Any]) -> None:
    # Even past our own config check, Keras is asked to load in safe mode.
    import keras

    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(tf_models["dir"] / "lambda.keras", safe_mode=True)


def test_sample_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  tf_models: dict[str, Any]) -> None:
    np.save(tmp_path / "wide.npy", np.zeros((2, 7), np.float32))
    home = tmp_path / "home"
    code = main(["--home", str(home), "pack", str(tf_models["dir"] / "functional.keras"), "--name", "dense",
                 "--sample", str(tmp_path / "wide.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "[-1, 4]" in err
    assert_store_empty(Store(home))


def test_damaged_files_are_one_line(tmp_path: Path, store: Store) -> None:
    import zipfile

    bad = tmp_path / "broken.keras"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("config.json", "{not json")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"\x00garbage")
    for path in (bad, saved):
        with pytest.raises(FrameworkError) as info:
            pack(path, "m", store)
        assert path.name in str(info.value) and "\n" not in str(info.value)
    assert_store_empty(store)
