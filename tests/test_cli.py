from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelpod.cli import main


def run(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_store_commands_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    path, sample, est = sklearn_model
    home = tmp_path / "home"
    np.save(tmp_path / "s.npy", sample)
    code, out, _ = run(capsys, home, "pack", str(path), "--name", "lr", "--sample", str(tmp_path / "s.npy"),
                       "--label", "team=ml", "--json")
    assert code == 0
    packed = json.loads(out)
    assert packed["name"] == "lr" and packed["version"] == 1 and packed["digest"].startswith("sha256:")
    assert run(capsys, home, "pack", str(path), "--name", "lr", "--sample", str(tmp_path / "s.npy"),
               "--parent", "lr:1")[0] == 0
    assert run(capsys, home, "tag", "lr:1", "production", "--json")[0] == 0
    code, out, _ = run(capsys, home, "list", "--json")
    listed = json.loads(out)
    assert [(r["version"], r["aliases"]) for r in listed] == [(1, ["production"]), (2, [])]
    code, out, _ = run(capsys, home, "show", "lr@production", "--json")
    assert json.loads(out)["manifest"]["labels"] == {"team": "ml"}
    code, out, _ = run(capsys, home, "verify", "lr:2", "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    code, out, _ = run(capsys, home, "predict", "lr@production", "--input", str(tmp_path / "s.npy"), "--json")
    response = json.loads(out)
    assert response["outputs"][0]["data"] == est.predict(sample).tolist()  # type: ignore[attr-defined]

    request = {"id": "r1", "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [5, 20],
                                       "data": sample.tolist()}]}
    (tmp_path / "req.json").write_text(json.dumps(request))
    code, out, _ = run(capsys, home, "predict", "lr", "--input", str(tmp_path / "req.json"), "--json")
    assert json.loads(out)["id"] == "r1"

    tar = tmp_path / "lr.tar"
    assert run(capsys, home, "export", "lr:1", "-o", str(tar))[0] == 0
    code, out, _ = run(capsys, tmp_path / "other", "import", str(tar), "--json")
    assert code == 0 and json.loads(out)["digest"] == packed["digest"]

    assert run(capsys, home, "rm", "lr@production", "--alias")[0] == 0
    assert run(capsys, home, "rm", "lr:1")[0] == 0
    code, out, _ = run(capsys, home, "list", "--json")
    assert [r["version"] for r in json.loads(out)] == [2]


def test_verify_reports_the_tampered_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    home = tmp_path / "home"
    np.save(tmp_path / "s.npy", sklearn_model[1])
    run(capsys, home, "pack", str(sklearn_model[0]), "--name", "lr", "--sample", str(tmp_path / "s.npy"))
    (victim,) = (home / "pods").glob("*/model/model.skops")
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    code, out, err = run(capsys, home, "verify", "lr:1")
    assert code == 3 and "model/model.skops" in err
    code, _, err = run(capsys, home, "predict", "lr:1", "--input", str(tmp_path / "s.npy"))
    assert code == 2 and "model/model.skops" in err and "tampered" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["show", "nope"], "no pod"),
        (["show", "Bad:Ref"], "bad pod reference"),
        (["tag", "nope:1", "prod"], "no pod nope:1"),
        (["import", "/nonexistent.tar"], "no such file"),
    ],
)
def test_errors_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], needle: str) -> None:
    code, _, err = run(capsys, tmp_path / "home", *argv)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and err.startswith("error: ")


def test_pack_failure_exit_2_nothing_left(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    home = tmp_path / "home"
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    code, _, err = run(capsys, home, "pack", str(sklearn_model[0]), "--name", "lr",
                       "--sample", str(tmp_path / "bad.npy"))
    assert code == 2 and "sample does not fit" in err and err.count("\n") == 1
    assert run(capsys, home, "list", "--json")[1].strip() == "[]"
    assert list((home / "tmp").iterdir()) == []


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from modelpod.errors import UsageError
    from modelpod.settings import Settings

    s = Settings.from_env({"MODELPOD_HOME": str(tmp_path), "MODELPOD_PORT": "9000", "MODELPOD_LAZY_LOAD": "yes"})
    assert (s.home, s.port, s.lazy_load) == (tmp_path, 9000, True)
    assert Settings.from_env({"MODELPOD_PORT": "9000"}, port=7).port == 7
    with pytest.raises(UsageError, match="MODELPOD_PORT"):
        Settings.from_env({"MODELPOD_PORT": "x"})
