"""FedLMG's own keys (defaults: the paper's code where the CPU budget allows).

Images per (client, class) are the shared ``images-per-class`` (the paper: 30).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import KeysModel
from common.models import ArchList, arch_list


class FedLmgConfig(KeysModel):
    """FedLMG's own keys (``fedlmg-*``): the aggregation, the latent guidance
    and the clients' architectures."""

    fedlmg_aggregation: Literal["ft", "md", "sd"] = Field("ft")
    """how the global model learns the guided images: `ft` cross-entropy (the code's
    default), `md` + the averaged client ensemble's soft labels, `sd` + the soft
    labels of the client model that guided each image"""
    # The code's raw step 1 is tuned to SD latents decoded by the VAE at 224 px; a
    # raw gradient's size depends on the decoder, resolution and models.
    fedlmg_guidance_norm: Literal["rms", "none"] = Field("rms")
    """`rms` moves each image's latent `step` noise standard deviations (sqrt(1 - a_t),
    root mean square per element) along the gradient of its client model's loss;
    `none` is the code's x_t <- x_t - step * grad"""
    fedlmg_guidance_step: float = Field(0.5, gt=0, le=1000)
    """size of that move (code: 1 with `none`)"""
    fedlmg_bn_weight: float = Field(0.1, ge=0, le=1000)
    """weight of the BN-statistic term beside the cross-entropy (code: 0.1)"""
    fedlmg_warmup_steps: int = Field(2, ge=0, le=100)
    """BN-only moves of the latent at t = T before sampling (code: 10; each is a UNet
    forward and backward per image, so the CPU default is 2)"""
    fedlmg_guided_fraction: float = Field(1.0, gt=0, le=1)
    """share of the sampling steps that are classifier-guided (code: all)"""
    fedlmg_client_classifiers: ArchList = Field("")
    """the clients' classifiers by partition id modulo the list (empty: `classifier`); a
    SuperNode's node-config `classifier` overrides it"""

    def client_classifiers(self) -> list[str]:
        """The architectures of ``fedlmg-client-classifiers``, blanks dropped
        (empty: every client uses ``classifier``)."""
        return arch_list(self.fedlmg_client_classifiers)
