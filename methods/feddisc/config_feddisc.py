"""FedDISC's own keys."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class FedDiscConfig(KeysModel):
    # k-means centres per (client, class) (paper: 5)
    feddisc_clusters: int = Field(5, ge=1, le=100)
    # s in eps = eps_u + s (eps_centre - eps_u) + s (eps_client - eps_u) (code: 2)
    feddisc_guidance: float = Field(2.0, ge=1, le=50)
    # public (image, caption) pairs the server fits the image -> text map on
    feddisc_map_pairs: int = Field(2000, ge=10, le=100_000)
