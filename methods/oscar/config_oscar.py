"""OSCAR's own keys."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class OscarConfig(KeysModel):
    """OSCAR's own key: conditioning vectors per (client, class)."""

    prototypes_per_class: int = Field(3, ge=1, le=16)
    """conditioning vectors per (client, class): 1 is OSCAR's per-class mean; k > 1
    uploads the k-means centres of the class's caption embeddings with their counts
    (images are spread over them by count)"""
