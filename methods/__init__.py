"""The registry of one-shot methods: adding one is a folder and one line here.

Each method lives in ``methods/<name>/`` with fixed file prefixes:
``config_<name>.py`` (its own keys, a pydantic model), ``payload_<name>.py`` (its
record layout: pack, unpack, validate; used by both sides), ``client_<name>.py``
(Flower-free client work) and ``server_<name>.py`` (check, validate, server work,
push). A method with no client work or no keys of its own has no such file. Its
``__init__.py`` exports the class and declares its ``CARD`` (``methods/card.py``),
its ``README.md`` describes it; ``python -m methods docs`` (``methods/docs.py``)
writes pyproject's defaults and README's tables from this registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.config import ConfigError, RunConfig, all_keys, parse_config

from .base import OneShotMethod
from .class_names import ClassNames
from .dense import Dense
from .fedavg import FedAvg
from .feddeo import FedDeo
from .feddiff import FedDiff
from .feddisc import FedDisc
from .fedld import FedLD
from .fedlmg import FedLmg
from .fgl_instance import FglInstance
from .guha import Guha
from .local import Local
from .lora import Lora
from .oscar import Oscar
from .public_only import PublicOnly
from .zero_shot import ZeroShot

METHODS: dict[str, type[OneShotMethod]] = {
    m.name: m
    for m in (
        Oscar,
        FedAvg,
        ClassNames,
        Local,
        PublicOnly,
        ZeroShot,
        Lora,
        FedDisc,
        FedLmg,
        FedDeo,
        FedDiff,
        Dense,
        FglInstance,
        FedLD,
        Guha,
    )
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
