"""FedDEO's own keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import KeysModel


class FedDeoConfig(KeysModel):
    # s1, s2 in eps = eps_u + s1 (eps_class - eps_u) + s2 (eps_desc - eps_u)
    # (paper and code: 3 and 3); s1 = 0 drops the class-prompt term
    feddeo_class_guidance: float = Field(3.0, ge=0, le=50)
    feddeo_description_guidance: float = Field(3.0, ge=1, le=50)
    # client optimisation of one description per class (code: SGD, batch 1, 1 epoch)
    feddeo_optimizer: Literal["sgd", "adam"] = "sgd"
    feddeo_learning_rate: float = Field(10.0, gt=0, le=1e6)
    feddeo_epochs: int = Field(1, ge=1, le=1000)
    feddeo_batch_size: int = Field(1, ge=1, le=4096)
