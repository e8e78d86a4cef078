"""FedDEO's own keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import KeysModel


class FedDeoConfig(KeysModel):
    """FedDEO's own keys (``feddeo-*``): the two guidance scales and the
    clients' optimisation of the descriptions."""

    # eps = eps_u + s1 (eps_class - eps_u) + s2 (eps_desc - eps_u)
    feddeo_class_guidance: float = Field(3.0, ge=0, le=50)
    """s1 in eps = eps_u + s1 (eps_class - eps_u) + s2 (eps_desc - eps_u) (paper and
    code: 3; 0 drops the class-prompt term)"""
    feddeo_description_guidance: float = Field(3.0, ge=1, le=50)
    """s2, the guidance of the client's learned description (paper and code: 3)"""
    # the client's optimisation of one description per class (code: SGD, batch 1,
    # 1 epoch)
    feddeo_optimizer: Literal["sgd", "adam"] = Field("sgd")
    """the clients' optimiser of the descriptions (code: SGD)"""
    feddeo_learning_rate: float = Field(10.0, gt=0, le=1e6)
    """the clients' learning rate of the descriptions (code: 10)"""
    feddeo_epochs: int = Field(1, ge=1, le=1000)
    """passes over each class's images on the client (code: 1)"""
    feddeo_batch_size: int = Field(1, ge=1, le=4096)
    """images per optimisation step on the client (code: 1)"""
