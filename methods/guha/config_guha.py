"""Guha et al.'s own keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import KeysModel

Selection = Literal["client-cv", "server-cv", "data", "random", "all"]


class GuhaConfig(KeysModel):
    """Guha et al.'s own keys: how the ensemble is selected, its size and the
    public images used to validate and to distil."""

    guha_selection: Selection = Field("client-cv")
    """which client models enter the ensemble: client-cv (the paper's CV selection: the
    best validation accuracy each client measured on its own held-out split),
    server-cv (the best accuracy on the server's labelled public images), data (the
    most training examples), random, all"""
    guha_ensemble_fraction: float = Field(0.5, gt=0, le=1)
    """the ensemble keeps ceil(this x valid clients) models (at least one), chosen by
    guha-selection"""
    guha_distill_images: int = Field(5000, ge=1)
    """unlabelled public images the ensemble is distilled on"""
    guha_validation_images: int = Field(1000, ge=1)
    """labelled public images, disjoint from the distillation set, that score the models
    for server-cv and the ensemble for the report"""
