"""How a replica process starts: the seam where a pod's own environment plugs in.

A replica of a model served with ``isolation: process`` is the command::

    [launch.python, "-m", "modelpod.serving.replica_child", "--fd", N]

run with the server's environment plus ``launch.env``, with ``N`` one end of a socket pair (see
``serving/messages.py`` for what is said over it). ``python`` defaults to the server's own
interpreter (``sys.executable``); any interpreter works whose ``import modelpod`` finds the same
modelpod version (installed there, or put on ``PYTHONPATH`` through ``env``), so a virtual
environment built from a pod's lock serves that pod (``serving/envs.py`` fills ``python``/``env``).

``prepare`` is called once per model load, on the event loop, before the first replica starts; it
may take long (building an environment) and raise a ``ModelpodError`` to fail that model's load.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelpod.serving.registry import ModelEntry
    from modelpod.settings import Settings

CHILD_MODULE = "modelpod.serving.replica_child"


@dataclass(frozen=True)
class Launch:
    """The interpreter a replica runs under and the variables added to its environment."""

    python: str = field(default_factory=lambda: sys.executable)
    env: Mapping[str, str] = field(default_factory=dict)
    why: str = ""  # shown in logs: "server environment", "own environment <digest>"

    def argv(self, fd: int) -> list[str]:
        return [self.python, "-m", CHILD_MODULE, "--fd", str(fd)]


async def prepare(entry: ModelEntry, settings: Settings) -> Launch:
    """The launch for ``entry``'s replicas: the server's own interpreter unless the pod needs its own."""
    choice = entry.env
    if choice is not None and choice.own and entry.manifest is not None:
        from modelpod.serving.envs import launch_in_env

        return await launch_in_env(choice, settings.home, entry.manifest.framework, entry.label)
    return Launch(why="server environment")
