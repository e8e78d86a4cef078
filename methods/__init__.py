"""The registry of one-shot methods: adding one is a folder and one line here.

Each method lives in ``methods/<name>/`` with fixed file prefixes:
``config_<name>.py`` (its own keys, a pydantic model), ``payload_<name>.py`` (its
record layout: pack, unpack, validate; used by both sides), ``client_<name>.py``
(Flower-free client work) and ``server_<name>.py`` (check, validate, server work,
push). A method with no client work or no keys of its own has no such file. Its
``__init__.py`` exports the class, its ``card.toml`` is its row of README's method
table (``methods/card.py``), its ``README.md`` describes it; ``python -m methods docs`` (``methods/docs.py``)
writes pyproject's defaults and README's tables from this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from common.config import ConfigError, RunConfig, all_keys, parse_config

from .base import OneShotMethod

# The registry: one line per method folder, in the order of README's tables.
# Each folder's ``__init__.py`` exports its OneShotMethod subclass in ``__all__``.
FOLDERS: tuple[str, ...] = (
    "oscar",
    "fedavg",
    "class_names",
    "local",
    "public_only",
    "zero_shot",
    "lora",
    "feddisc",
    "fedlmg",
    "feddeo",
    "feddiff",
    "dense",
    "fgl_instance",
    "fedld",
    "guha",
    "fedbip",
    "fedhydra",
    "dosfl",
)


def _method_class(folder: str) -> type[OneShotMethod]:
    """The one OneShotMethod subclass that ``methods/<folder>/`` exports."""
    module = importlib.import_module(f"{__name__}.{folder}")
    found = [
        obj
        for key in getattr(module, "__all__", ())
        if isinstance(obj := getattr(module, key), type)
        and issubclass(obj, OneShotMethod)
    ]
    if len(found) != 1:
        raise ImportError(
            f"methods/{folder}/__init__.py must list exactly one OneShotMethod "
            f"subclass in __all__; it lists {[c.__name__ for c in found]}"
        )
    return found[0]


METHODS: dict[str, type[OneShotMethod]] = {
    cls.name: cls for cls in map(_method_class, FOLDERS)
}


def get_method(name: str) -> OneShotMethod:
    """An instance of the registered method ``name`` (``ValueError``, listing
    the registered names, if there is none)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]()


def build_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The run config, validated once: shared keys and every method's own keys."""
    return parse_config(run_config, {n: m.config for n, m in METHODS.items()})


def config_keys() -> list[str]:
    """Every run-config key (README's table lists exactly these)."""
    return all_keys({n: m.config for n, m in METHODS.items()})


__all__ = [
    "METHODS",
    "ConfigError",
    "OneShotMethod",
    "RunConfig",
    "build_config",
    "config_keys",
    "get_method",
]
