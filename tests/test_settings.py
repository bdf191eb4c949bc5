from __future__ import annotations

from pathlib import Path

import pytest

from modelpod.cli import main
from modelpod.errors import UsageError
from modelpod.settings import Settings


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("TRUE", True), (" on ", True), ("1", True),
                                            ("yes", True), ("false", False), ("0", False), ("no", False),
                                            ("Off", False)])
def test_boolean_words(raw: str, value: bool) -> None:
    assert Settings.from_env({"MODELPOD_LAZY_LOAD": raw}).lazy_load is value
    assert Settings.from_env({"MODELPOD_LOG_JSON": raw}).log_json is value


@pytest.mark.parametrize("raw", ["ture", "flase", "2", "enabled", "y"])
def test_anything_else_is_a_usage_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(UsageError, match=rf"MODELPOD_LAZY_LOAD must be true or false.*{raw!r}"):
        Settings.from_env({"MODELPOD_LAZY_LOAD": raw})


def test_the_cli_reports_it_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELPOD_LOG_JSON", "ture")
    assert main(["--home", str(tmp_path / "home"), "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MODELPOD_LOG_JSON" in err and "'ture'" in err
