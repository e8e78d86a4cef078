"""FedDISC's own keys."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class FedDiscConfig(KeysModel):
    """FedDISC's own keys (``feddisc-*``): centres per (client, class), the
    guidance scale and the public pairs of the image-to-text map."""

    feddisc_clusters: int = Field(5, ge=1, le=100)
    """k-means centres per (client, class) of the clients' CLIP image embeddings (paper:
    5)"""
    feddisc_guidance: float = Field(2.0, ge=1, le=50)
    """s in eps = eps_u + s (eps_centre - eps_u) + s (eps_client - eps_u) (code: 2)"""
    feddisc_map_pairs: int = Field(2000, ge=10, le=100_000)
    """public (image, caption) pairs the server fits the image-to-text-embedding map on"""
