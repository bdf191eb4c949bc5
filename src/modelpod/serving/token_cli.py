"""``modelpod token new``: a fresh bearer token and its entry for a token file, holding only its sha256.

    modelpod token new --name churn-app --scopes infer --models churn [--rate 5 --burst 10] [--json]

The token is printed once (give it to the client); the entry (YAML, or ``"entry"`` with ``--json``)
goes under ``tokens:`` in the file ``serve --token-file`` reads (protocols/auth.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
from typing import Any

import yaml

from modelpod.errors import UsageError
from modelpod.protocols.auth import SCOPES, parse_table
from modelpod.settings import Settings


def add_arguments(c: argparse.ArgumentParser) -> None:
    """The ``token`` subcommands (``c`` is the ``modelpod token`` parser)."""
    sub = c.add_subparsers(dest="token_action", required=True, metavar="{new}")
    a = sub.add_parser("new", help="a new random token and its token-file entry (sha256 only)")
    a.add_argument("--name", required=True, help="what errors and logs call the token")
    a.add_argument("--scopes", default="infer", help=f"comma-separated: {', '.join(SCOPES)} (default infer)")
    a.add_argument("--models", help="comma-separated models or routes the token is limited to (default: all)")
    a.add_argument("--rate", type=float, help="requests/s allowed on average (default: no limit)")
    a.add_argument("--burst", type=float, help="requests allowed at once (default: the rate)")
    a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def token_command(args: argparse.Namespace, settings: Settings) -> int:
    token = "mp_" + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"name": args.name, "sha256": hashlib.sha256(token.encode()).hexdigest(),
                             "scopes": _list(args.scopes)}
    if args.models:
        entry["models"] = _list(args.models)
    if args.rate is not None:
        entry["rate"] = args.rate
    if args.burst is not None:
        if args.rate is None:
            raise UsageError("--burst needs --rate")
        entry["burst"] = args.burst
    parse_table({"tokens": [entry]}, "(the new entry)")  # the server would refuse what this refuses
    if getattr(args, "json", False):
        print(json.dumps({"token": token, "entry": entry}))
        return 0
    print(f"token (give it to the client; modelpod keeps no copy):\n  {token}\n")
    print("entry for the token file (under tokens:):")
    print(yaml.safe_dump([entry], sort_keys=False, default_flow_style=None).rstrip())
    return 0


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
