from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fwutil import TEXTS, Check, assert_store_empty, sig

from modelpod.cli import main
from modelpod.errors import FrameworkError, InvalidRequestError, UnsafeModelError
from modelpod.frameworks import detect
from modelpod.frameworks import transformers as adapter
from modelpod.packing import pack
from modelpod.pod import Pod
from modelpod.store import Store


def _reference(directory: Path, task: str) -> dict[str, np.ndarray]:
    """What transformers itself computes for TEXTS, used directly."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    net = cls.from_pretrained(directory, local_files_only=True).eval()
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        out = net(**enc)
    if task == "text-classification":
        logits = out.logits.numpy()
        return {"logits": logits, "label": np.array([net.config.id2label[int(i)] for i in logits.argmax(-1)])}
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return {"embedding": ((out.last_hidden_state * mask).sum(1) / mask.sum(1)).numpy()}


def test_text_classification(store: Store, check_pod: Check, hf_models: dict[str, Path]) -> None:
    d = hf_models["cls"]
    assert detect(d) == "transformers"
    rec = pack(d, "bert-cls", store)
    assert rec.manifest.options["task"] == "text-classification"  # from the config's architectures
    assert sig(rec) == {
        "inputs": [("text", "BYTES", [-1])],
        "outputs": [("logits", "FP32", [-1, 2]), ("label", "BYTES", [-1])],
    }
    roles = {f.path: f.role for f in rec.manifest.files}
    assert roles["model/model.safetensors"] == "weights" and roles["model/config.json"] == "config"
    check_pod(rec, np.array(TEXTS), _reference(d, "text-classification"), rtol=1e-4, atol=1e-5)


def test_feature_extraction_via_cli(store: Store, check_pod: Check, capsys: pytest.CaptureFixture[str],
                                    hf_models: dict[str, Path]) -> None:
    d = hf_models["enc"]
    code = main(["--home", str(store.home), "pack", str(d), "--name", "bert-enc", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["framework"] == "transformers"
    rec = store.get("bert-enc")
    assert rec.manifest.options["task"] == "feature-extraction"
    assert sig(rec)["outputs"] == [("embedding", "FP32", [-1, 32])]
    check_pod(rec, np.array(TEXTS), _reference(d, "feature-extraction"), rtol=1e-4, atol=1e-5)


def test_empty_batch(store: Store, hf_models: dict[str, Path]) -> None:
    import modelpod

    rec = pack(hf_models["cls"], "bert-cls", store)
    model = modelpod.load(rec.ref, store=store)
    # Zero rows are refused by the one input check (a 400 on the servers), before the model runs.
    with pytest.raises(InvalidRequestError, match="zero rows"):
        model(np.array([], dtype=object))


def test_pickled_weights_need_the_opt_in(store: Store, check_pod: Check, hf_models: dict[str, Path]) -> None:
    d = hf_models["bin"]
    assert (d / "pytorch_model.bin").is_file() and detect(d) == "transformers"
    with pytest.raises(UnsafeModelError, match=r"pytorch_model\.bin.*--allow-pickle"):
        pack(d, "bert-bin", store)
    assert_store_empty(store)
    rec = pack(d, "bert-bin", store, allow_pickle=True)
    assert rec.manifest.allow_pickle
    check_pod(rec, np.array(TEXTS), _reference(hf_models["cls"], "text-classification"), rtol=1e-4, atol=1e-5)
    pod = store.open(rec.ref)
    model = adapter.load(Pod(pod.path, replace(pod.manifest, allow_pickle=False)))
    with pytest.raises(UnsafeModelError, match="did not opt in"):
        model.load()


def test_pickles_are_left_out_when_safetensors_exist(tmp_path: Path, store: Store,
                                                     hf_models: dict[str, Path]) -> None:
    d = tmp_path / "both"
    shutil.copytree(hf_models["cls"], d)
    shutil.copyfile(hf_models["bin"] / "pytorch_model.bin", d / "pytorch_model.bin")
    (d / "modeling_custom.py").write_text("raise SystemExit('remote code must never run')\n")
    rec = pack(d, "bert", store)  # no opt-in needed: the pickle is not packed
    paths = {f.path for f in rec.manifest.files}
    assert "model/model.safetensors" in paths
    assert not any(p.endswith((".bin", ".py")) for p in paths)


def test_task_option_and_unknown_architectures(store: Store, hf_models: dict[str, Path]) -> None:
    rec = pack(hf_models["cls"], "bert", store, options={"task": "feature-extraction", "pooling": "cls"})
    assert sig(rec)["outputs"] == [("embedding", "FP32", [-1, 32])]
    assert adapter.infer_task({"architectures": ["BertModel"]}) == "feature-extraction"
    with pytest.raises(FrameworkError, match="task=feature-extraction"):
        adapter.infer_task({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(FrameworkError, match="task='translation'"):
        pack(hf_models["cls"], "bert", store, options={"task": "translation"})


def test_damaged_weights_are_one_line(tmp_path: Path, store: Store, hf_models: dict[str, Path]) -> None:
    d = tmp_path / "broken"
    shutil.copytree(hf_models["enc"], d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(FrameworkError) as info:
        pack(d, "bert", store)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)
    assert_store_empty(store)
