"""The console's files ship in the wheel (package data) and the page names only files the server serves."""

from __future__ import annotations

import fnmatch
import re
from importlib import resources
from pathlib import Path

import tomllib

from modelpod.console.app import ASSETS

REPO = Path(__file__).resolve().parents[2]


def test_every_static_file_is_package_data() -> None:
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["modelpod"]
    static = resources.files("modelpod.console").joinpath("static")
    names = sorted(p.name for p in static.iterdir() if p.is_file())
    assert {"index.html", "login.html", *ASSETS} <= set(names)
    for name in names:
        assert any(fnmatch.fnmatch(f"console/static/{name}", g) for g in globs), name


def test_pages_load_only_what_the_console_serves() -> None:
    static = resources.files("modelpod.console").joinpath("static")
    for page in ("index.html", "login.html"):
        html = static.joinpath(page).read_text(encoding="utf-8")
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs, page
        for ref in refs:
            assert ref.startswith("/console/static/") and ref.rsplit("/", 1)[1] in ASSETS, (page, ref)
    script = static.joinpath("console.js").read_text(encoding="utf-8")
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", "") and "https://" not in script
