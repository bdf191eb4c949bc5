"""The image's entrypoint: ``docker run IMAGE [serve flags]`` serves the pod it holds, and
``docker run IMAGE batch --input ... --output ...`` scores files with it (``modelpod batch POD ...``)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence


def argv_for(pod: str, args: Sequence[str]) -> list[str]:
    """The ``modelpod`` command line for the image's arguments."""
    rest = list(args)
    if rest[:1] == ["batch"]:
        if rest[1:2] == ["merge"]:
            return ["batch", "merge", *rest[2:]]
        return ["batch", pod, *rest[1:]]
    if rest[:1] == ["serve"]:
        rest = rest[1:]
    return ["serve", pod, *rest]


def main(argv: Sequence[str] | None = None) -> int:
    from modelpod.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m modelpod.entry POD_DIR [serve flags | batch ...]", file=sys.stderr)
        return 2
    command = argv_for(args[0], args[1:])
    if command[0] == "batch" and importlib.util.find_spec("pyarrow") is None:
        print("error: this image was built without batch support (pyarrow); rebuild it with "
              "`modelpod build REF --with batch`", file=sys.stderr)
        return 2
    return cli_main(command)


if __name__ == "__main__":
    raise SystemExit(main())
