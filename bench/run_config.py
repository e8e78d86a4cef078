"""The run config every benchmark starts from, and the options that change it.

A benchmark reads the app's defaults (``[tool.flwr.app.config]`` of
pyproject.toml) once per process, adds its own keys and the user's ``--set``
overrides, and validates the result with the app's own config model before any
work.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (flwr depends on tomli)
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _pyproject_defaults() -> tuple[tuple[str, Any], ...]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tuple(tomllib.load(f)["tool"]["flwr"]["app"]["config"].items())


def default_run_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml, read once per process:
    a benchmark keeps the defaults it started with while the file is edited (the
    modules it imported do not change either)."""
    return dict(_pyproject_defaults())


def build_cfg(overrides: dict[str, Any]) -> Any:
    """The app's validated ``RunConfig`` for the defaults plus ``overrides``.

    Raises
    ------
    common.config.ConfigError
        If a key is unknown or a value out of range (the app's own checks).
    """
    from methods import build_config

    return build_config(default_run_config() | overrides)


def parse_seeds(text: str) -> list[int]:
    """``"0,1, 2"`` -> ``[0, 1, 2]``, ``"0-9"`` -> ``[0, ..., 9]`` (``--seeds``),
    duplicates dropped.

    Raises
    ------
    ValueError
        If ``text`` holds a non-integer, an empty range or no seed at all.
    """
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            lo, sep, hi = (
                part.partition("-") if not part.startswith("-") else (part, "", "")
            )
            if sep:
                if int(hi) < int(lo):
                    raise ValueError
                seeds += range(int(lo), int(hi) + 1)
            else:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(
            f"--seeds {text!r}: use comma-separated integers or ranges, e.g. "
            "0,1,2 or 0-9"
        ) from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: give at least one seed")
    return list(dict.fromkeys(seeds))


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as run-config overrides.

    Each value is read as Flower's ``--run-config`` reads it (a TOML scalar); a
    value that is not one (``captioner=oracle``) is kept as a bare string.

    Raises
    ------
    ValueError
        If an item has no ``=``.
    """
    from .flower_runs import parse_run_config_string

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(
                f"--set {item!r}: use KEY=VALUE, e.g. --set train-epochs=3"
            )
        key, value = item.split("=", 1)
        try:
            out |= parse_run_config_string(f"{key}={value}")
        except Exception:
            out[key] = value  # a bare string
    return out
