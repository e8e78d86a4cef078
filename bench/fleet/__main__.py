"""``python -m bench.fleet``: the command, and the entry of its child processes."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
