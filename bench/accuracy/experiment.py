"""Experiments as small TOML files a user can copy (``--experiment FILE``).

A file holds the accuracy bench's options and the run-config overrides of
every run (``bench/experiments/*.toml`` are examples)::

    seeds = [0, 1, 2]
    clients = 4
    methods = ["oscar", "class-names", "centralized"]
    quick = true

    [run-config]  # as --set KEY=VALUE, for every run
    train-epochs = 3

Options given on the command line win over the file's, and ``--set`` over its
``[run-config]``. The file is checked whole before any run: an unknown key or
a value of the wrong type is an error that names it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (flwr depends on tomli)
    import tomli as tomllib

RUN_CONFIG = "run-config"
# file key -> (argparse destination, the types it takes)
OPTIONS: dict[str, tuple[str, tuple[type, ...]]] = {
    "seeds": ("seeds", (list, str, int)),
    "clients": ("clients", (int,)),
    "methods": ("methods", (list, str)),
    "quick": ("quick", (bool,)),
    "world": ("world", (str,)),
    "no-fid": ("no_fid", (bool,)),
    "fid-per-class": ("fid_per_class", (int,)),
    "timeout-s": ("timeout_s", (int, float)),
}


def load_experiment(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an experiment file.

    Parameters
    ----------
    path
        A TOML file with keys of ``OPTIONS`` and an optional ``[run-config]``
        table.

    Returns
    -------
    tuple
        ``(defaults, run_config)``: argparse defaults for the bench's options,
        and the run-config overrides of every run.

    Raises
    ------
    ValueError
        If the file cannot be read or parsed, a key is unknown or a value has
        the wrong type.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"--experiment {str(path)!r}: {e}") from None
    run_config = data.pop(RUN_CONFIG, {})
    if not isinstance(run_config, dict):
        raise ValueError(
            f"--experiment {str(path)!r}: [{RUN_CONFIG}] must be a table of "
            f"run-config keys, got {run_config!r}"
        )
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        if key not in OPTIONS:
            raise ValueError(
                f"--experiment {str(path)!r}: unknown key {key!r}; use "
                f"{', '.join(OPTIONS)} or a [{RUN_CONFIG}] table"
            )
        dest, types = OPTIONS[key]
        # bool is an int: a flag given as 1 or a count given as true is refused
        if not isinstance(value, types) or (
            isinstance(value, bool) and bool not in types
        ):
            raise ValueError(
                f"--experiment {str(path)!r}: {key} = {value!r} must be "
                f"{' or '.join(t.__name__ for t in types)}"
            )
        if key == "seeds":
            value = ",".join(map(str, value if isinstance(value, list) else [value]))
        elif key == "methods" and isinstance(value, str):
            value = [value]
        defaults[dest] = value
    return defaults, dict(run_config)
