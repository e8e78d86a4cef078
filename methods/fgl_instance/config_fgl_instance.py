"""FGL-instance's own keys."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class FglInstanceConfig(KeysModel):
    """FGL-instance's own key: the cap on instance prompts a client uploads per
    class."""

    fgl_instances_per_class: int = Field(0, ge=0)
    """instance prompts a client uploads per class: 0 uploads one per training image
    (FGL's instance level); k > 0 a seeded random k of each class's images (bounds
    the upload of a large client)"""
