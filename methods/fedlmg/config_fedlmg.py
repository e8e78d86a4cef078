"""FedLMG's own keys (defaults: the paper's code where the CPU budget allows)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.config import KeysModel
from common.models import ARCHS


class FedLmgConfig(KeysModel):
    # how the global model learns from the guided images: ft = cross-entropy (the
    # code's default), md = + soft labels of the averaged client ensemble, sd = +
    # soft labels of the client model that guided each image
    fedlmg_aggregation: Literal["ft", "md", "sd"] = "ft"
    # rms: each image's latent moves `step` noise standard deviations (sqrt(1 - a_t),
    # root mean square per element) along its gradient; none: x_t <- x_t - step *
    # grad, the code's (its step 1 is tuned to SD latents decoded by the VAE at
    # 224 px; a raw gradient's size depends on the decoder, resolution and models)
    fedlmg_guidance_norm: Literal["rms", "none"] = "rms"
    # the move's size (code: 1 with norm none)
    fedlmg_guidance_step: float = Field(0.5, gt=0, le=1000)
    # weight of the BN-statistic term beside the cross-entropy (code: 0.1)
    fedlmg_bn_weight: float = Field(0.1, ge=0, le=1000)
    # images per (client, class the client has examples of) (paper: 30)
    fedlmg_images_per_class: int = Field(30, ge=1, le=100_000)
    # BN-only moves of the latent at t = T before sampling (code: 10; each costs a
    # UNet forward and backward per image, so the CPU default is 2)
    fedlmg_warmup_steps: int = Field(2, ge=0, le=100)
    # fraction of the sampling steps that are classifier-guided (code: all)
    fedlmg_guided_fraction: float = Field(1.0, gt=0, le=1)
    # clients' classifiers, by partition id modulo the list (empty: `classifier`);
    # a SuperNode's node-config `classifier` overrides it
    fedlmg_client_classifiers: str = ""

    @field_validator("fedlmg_client_classifiers")
    @classmethod
    def _archs(cls, v: str) -> str:
        bad = [a for a in v.split(",") if a.strip() and a.strip() not in ARCHS]
        if bad:
            raise ValueError(
                f"fedlmg-client-classifiers={v!r}: {bad} not in {', '.join(ARCHS)}"
            )
        return v

    def client_classifiers(self) -> list[str]:
        return [
            a.strip() for a in self.fedlmg_client_classifiers.split(",") if a.strip()
        ]
