from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fwutil import Check, assert_store_empty, sig

from modelpod.cli import main
from modelpod.errors import FrameworkError, SignatureError, UnsafeModelError
from modelpod.frameworks import detect
from modelpod.frameworks import torch as adapter
from modelpod.packing import pack
from modelpod.pod import Pod
from modelpod.store import Store


def test_torchscript_with_sample(store: Store, check_pod: Check, torch_models: dict[str, Any]) -> None:
    d, x = torch_models["dir"], torch_models["x"]
    assert detect(d / "script.pt") == "torch" and adapter.kind(d / "script.pt") == "torchscript"
    rec = pack(d / "script.pt", "mlp", store, sample=d / "sample.npy")
    assert sig(rec) == {"inputs": [("input-0", "FP32", [-1, 4])], "outputs": [("output-0", "FP32", [-1, 2])]}
    assert rec.manifest.options["args"] == ["input"]
    check_pod(rec, x, {"output-0": torch_models["expected"]})


def test_torchscript_needs_a_sample(store: Store, torch_models: dict[str, Any]) -> None:
    with pytest.raises(SignatureError, match="--sample"):
        pack(torch_models["dir"] / "script.pt", "mlp", store)
    assert_store_empty(store)


def test_exported_program_carries_its_signature(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                store: Store, check_pod: Check,
                                                torch_models: dict[str, Any]) -> None:
    d = torch_models["dir"]
    assert adapter.kind(d / "program.pt2") == "export"
    code = main(["--home", str(store.home), "pack", str(d / "program.pt2"), "--name", "mlp", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["framework"] == "torch"
    rec = store.get("mlp")
    # Exported with Dim("batch"): the first dimension is free.
    assert sig(rec) == {"inputs": [("input", "FP32", [-1, 4])], "outputs": [("output-0", "FP32", [-1, 2])]}
    check_pod(rec, torch_models["x"], {"output-0": torch_models["expected"]})


def test_exported_dict_outputs_keep_their_names(tmp_path: Path, store: Store, check_pod: Check) -> None:
    import torch

    class Scores(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            z = self.lin(x)
            return {"logits": z, "prob": torch.softmax(z, -1)}

    torch.manual_seed(0)
    net = Scores().eval()
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    program = torch.export.export(net, (torch.from_numpy(x),), dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    torch.export.save(program, str(tmp_path / "scores.pt2"))
    rec = pack(tmp_path / "scores.pt2", "scores", store)
    assert sig(rec)["outputs"] == [("logits", "FP32", [-1, 3]), ("prob", "FP32", [-1, 3])]
    with torch.inference_mode():
        want = {k: v.numpy() for k, v in net(torch.from_numpy(x)).items()}
    check_pod(rec, x, want)


def test_threads_option(store: Store, torch_models: dict[str, Any]) -> None:
    import torch

    import modelpod

    before = torch.get_num_threads()
    rec = pack(torch_models["dir"] / "program.pt2", "mlp", store, options={"threads": "1"})
    try:
        model = modelpod.load(rec.ref, store=store)
        assert torch.get_num_threads() == 1
        model.unload()
    finally:
        torch.set_num_threads(before)


def test_torch_save_pickle_is_refused_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 torch_models: dict[str, Any]) -> None:
    d = torch_models["dir"]
    assert adapter.kind(d / "module.pt") == "pickle" and detect(d / "module.pt") == "torch"
    home = tmp_path / "home"
    code = main(["--home", str(home), "pack", str(d / "module.pt"), "--name", "mlp", "--sample",
                 str(d / "sample.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "module.pt" in err and "runs code" in err and "--allow-pickle" in err
    assert_store_empty(Store(home))


def test_torch_save_module_with_opt_in(store: Store, check_pod: Check, torch_models: dict[str, Any]) -> None:
    d = torch_models["dir"]
    rec = pack(d / "module.pt", "mlp", store, sample=d / "sample.npy", allow_pickle=True)
    assert rec.manifest.allow_pickle and rec.manifest.options["weights_only"] is False
    check_pod(rec, torch_models["x"], {"output-0": torch_models["expected"]})
    # The same files under a manifest without the opt-in: loading refuses the pickle.
    pod = store.open(rec.ref)
    model = adapter.load(Pod(pod.path, replace(pod.manifest, allow_pickle=False)))
    with pytest.raises(UnsafeModelError, match="did not opt in"):
        model.load()


def test_state_dict_cannot_run_alone(store: Store, torch_models: dict[str, Any]) -> None:
    with pytest.raises(FrameworkError, match="not a module"):
        pack(torch_models["dir"] / "state.pt", "mlp", store, allow_pickle=True, sample=torch_models["x"])
    assert_store_empty(store)


def test_malicious_pickle_refused_by_the_scan(store: Store, torch_models: dict[str, Any]) -> None:
    with pytest.raises(UnsafeModelError, match=r"posix\.system|os\.system"):
        pack(torch_models["dir"] / "evil.pt", "evil", store, allow_pickle=True, sample=torch_models["x"])
    assert_store_empty(store)


def test_damaged_archive_is_one_line(tmp_path: Path, store: Store) -> None:
    import zipfile

    bad = tmp_path / "broken.pt2"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("broken/archive_format", "pt2")
        zf.writestr("broken/models/model.json", "{not json")
    with pytest.raises(FrameworkError) as info:
        pack(bad, "m", store)
    assert "broken.pt2" in str(info.value) and "\n" not in str(info.value)
    assert_store_empty(store)


def test_detect_ignores_other_binaries(tmp_path: Path) -> None:
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"\x00\x01\x02\x03" * 10)
    assert not adapter.detect(odd)
