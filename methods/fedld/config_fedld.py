"""FedLD's own keys."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class FedLDConfig(KeysModel):
    """FedLD's own keys: mixture components per class, the SDEdit strength and
    the client's minimum of images per component."""

    fedld_components: int = Field(3, ge=1, le=16)
    """Gaussian components per (client, class) fitted to the generator-space latents of
    the class's images (diagonal covariances)"""
    fedld_min_per_component: int = Field(5, ge=1)
    """no uploaded mean averages fewer images: a class gets at most
    min(fedld-components, n // this) components, refitted with fewer while one has
    fewer images assigned; a class of fewer images is not uploaded"""
    fedld_em_iters: int = Field(50, ge=1, le=1000)
    """EM iterations of each mixture fit (client)"""
    fedld_strength: float = Field(0.7, gt=0, le=1)
    """fraction of the sampling schedule run from a mixture draw: the draw is noised to
    that step and denoised from there (SDEdit); 1 starts from almost pure noise,
    lower keeps more of the client's distribution"""
