"""The web console (``modelpod serve --console``): one self-contained page at ``/console``.

Models, versions and their state; routes with their weights and A/B report; live charts of
throughput, latency, errors, batch size and queue depth per model and variant; recent errors; a
try-it form; and the sections other rooms provide (drift, replicas). Plain HTML, CSS and
JavaScript shipped in the package (``static/``): no CDN, no build step. See docs/console.md.
"""

from __future__ import annotations

from modelpod.console.app import ConsoleApp
from modelpod.console.history import History

__all__ = ["ConsoleApp", "History"]
