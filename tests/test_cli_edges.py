"""CLI edges a new user hits: alias targets, missing directories, closed pipes, re-imports, NaN, bases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelpod.cli import main

_HALF = """
    import modelpod

    class Half(modelpod.Model):
        def predict(self, x: list[float]) -> list[float]:
            return [v / 2 if v >= 0 else float("nan") for v in x]
"""


def run(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A store holding half:1 (alias production) and half:2."""
    code = tmp_path / "half"
    code.mkdir()
    (code / "model.py").write_text(textwrap.dedent(_HALF))
    home = tmp_path / "home"
    for _ in range(2):
        assert run(capsys, home, "pack", str(code), "--name", "half")[0] == 0
    assert run(capsys, home, "tag", "half:1", "production")[0] == 0
    return home


def test_rm_of_an_alias_target_needs_force(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, home, "rm", "half@production")
    assert code == 2 and "half@production -> half:1" in err and "--force" in err
    code, _, err = run(capsys, home, "rm", "half:1")  # the same version by number
    assert code == 2 and "--force" in err
    code, _, err = run(capsys, home, "rm", "half", "--all")
    assert code == 2 and "--force" in err
    code, out, _ = run(capsys, home, "list", "--json")
    assert [r["version"] for r in json.loads(out)] == [1, 2]  # nothing was removed
    assert run(capsys, home, "rm", "half:2")[0] == 0  # no alias: no question
    code, out, _ = run(capsys, home, "rm", "half@production", "--force", "--json")
    assert code == 0 and json.loads(out) == {"removed": ["half:1"]}


def test_export_into_a_missing_directory_is_a_clear_error(home: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing" / "dir" / "x.tar"
    code, _, err = run(capsys, home, "export", "half:1", "-o", str(target))
    assert code == 2
    assert err.strip() == f"error: --output {target}: directory {target.parent} does not exist"
    assert not target.parent.exists()


def test_list_into_a_closed_pipe_exits_quietly(home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "modelpod", "--home", str(home), "list", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head` having exited before modelpod writes
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


def test_importing_the_same_archive_twice_returns_the_existing_version(
        home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tar = tmp_path / "half.tar"
    assert run(capsys, home, "export", "half:2", "-o", str(tar))[0] == 0
    other = tmp_path / "other"
    first = json.loads(run(capsys, other, "import", str(tar), "--json")[1])
    again = json.loads(run(capsys, other, "import", str(tar), "--json")[1])
    assert again == first and first["version"] == 1
    listed = json.loads(run(capsys, other, "list", "--json")[1])
    assert [r["version"] for r in listed] == [1]
    # into the store it came from: the version that already holds the digest
    back = json.loads(run(capsys, home, "import", str(tar), "--json")[1])
    assert back["version"] == 2
    renamed = json.loads(run(capsys, home, "import", str(tar), "--name", "half-copy", "--json")[1])
    assert (renamed["name"], renamed["version"]) == ("half-copy", 1)


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_predict_prints_valid_json_for_nan(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [3], "data": [2.0, -1.0, 4.0]}]}
    (tmp_path / "req.json").write_text(json.dumps(request))
    for flags in ((), ("--json",)):
        code, out, err = run(capsys, home, "predict", "half:1", "--input", str(tmp_path / "req.json"), *flags)
        assert code == 0, err
        body = _strict(out)
        assert body["outputs"][0]["data"] == [1.0, None, 2.0]  # type: ignore[index]


def test_build_without_base_on_an_unreachable_registry_gives_a_hint(
        home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing beyond loopback answers here, as on an air-gapped machine; a proxy must not help.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run(capsys, home, "build", "half:1")
    assert code == 2, err
    assert "without --base the image starts from python:3.11-slim" in err
    assert "--base oci:DIR" in err and "--base docker-archive:FILE" in err
    assert "Traceback" not in err


def test_list_prints_a_table_without_rich(home: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Images hold no rich (it is the CLI's, not serving's): the CLI still prints its tables there.
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    code, out, err = run(capsys, home, "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "ALIASES", "FRAMEWORK", "SIZE", "DIGEST"]
    assert [ln.split()[:3] for ln in lines[1:]] == [["half", "1", "production"], ["half", "2", "python"]]


def test_a_command_names_the_one_argument_group_to_build() -> None:
    from modelpod.arguments import command_of

    assert command_of(["serve", "lr"]) == "serve"
    assert command_of(["--home", "serve", "pack", "x"]) == "pack"  # --home takes the word after it
    assert command_of(["--home=/h", "list"]) == "list"
    assert command_of(["--help", "serve"]) is None  # the global help lists every command
    assert command_of(["nope"]) is None and command_of([]) is None


def test_each_command_parses_as_with_every_argument_built(capsys: pytest.CaptureFixture[str]) -> None:
    from modelpod.arguments import ARGUMENTS, parser

    for names, _ in ARGUMENTS:
        for name in names:
            helps = []
            for p in (parser(), parser(name)):
                with pytest.raises(SystemExit):
                    p.parse_args([name, "--help"])
                helps.append(capsys.readouterr().out)
            assert helps[0] == helps[1] and name in helps[0]


def test_serve_imports_none_of_the_other_commands_tooling() -> None:
    """`modelpod serve` parses its arguments without the image, deploy, batch or trust command modules."""
    code = ("import sys; from modelpod.cli import command_of, parser; "
            "argv = ['--home', '/nowhere', 'serve', 'lr', '--port', '0']; parser(command_of(argv)).parse_args(argv); "
            "print(sorted(m for m in sys.modules if m.startswith(('modelpod.image', 'modelpod.deploy', "
            "'modelpod.batch', 'modelpod.trust.cli', 'modelpod.serving.env_cli', 'modelpod.serving.route_cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
