"""``python -m methods docs [--check]``: see ``methods/docs.py``."""

from __future__ import annotations

import sys

USAGE = "usage: python -m methods docs [--check]"


def main(argv: list[str]) -> int:
    """Run ``python -m methods docs [--check]`` on ``argv`` (the arguments after
    ``-m methods``); returns the exit status (2, with the usage, for anything else)."""
    if not argv or argv[0] != "docs":
        print(USAGE, file=sys.stderr)
        return 2
    from .docs import main as docs

    return docs(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
