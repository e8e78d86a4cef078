"""Registry of one-shot methods: adding one is a module plus one line here."""

from __future__ import annotations

from .base import OneShotMethod
from .class_names import ClassNames
from .fedavg import FedAvg
from .local import Local
from .lora import Lora
from .oscar import Oscar

METHODS: dict[str, type[OneShotMethod]] = {
    Oscar.name: Oscar,
    FedAvg.name: FedAvg,
    ClassNames.name: ClassNames,
    Local.name: Local,
    Lora.name: Lora,
}


def get_method(name: str) -> OneShotMethod:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "OneShotMethod", "get_method"]
