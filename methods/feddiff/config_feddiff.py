"""FedDiff's own keys (the paper's section 2; where it gives no value, the choice
is documented in ``methods/feddiff/README.md``)."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class FedDiffConfig(KeysModel):
    """FedDiff's own keys (``feddiff-*``): the model folder, the generated
    parameter subset, the denoising step and the encoder fine-tuning."""

    feddiff_model: str = Field(
        "embedded",
        min_length=1,
        json_schema_extra={"allowed": '"embedded" or a folder'},
    )
    """weight pool, autoencoder and latent DDPM (`common/embedded/feddiff/`, or a folder
    built by `python -m bench pretrain --stage feddiff`)"""
    feddiff_params: str = Field(
        "features.4.1,head",
        min_length=1,
        json_schema_extra={"allowed": "parameter names or module prefixes"},
    )
    """the generated parameter subset: comma-separated parameter names or module
    prefixes of the classifier (must be the one the model was built for; the rest is
    the clients' average)"""
    feddiff_denoise_step: int = Field(100, ge=1, le=1000)
    """T: the latent DDPM denoises the superposed latent from this step (of 1000) down
    to 0 (Eq. 12)"""
    feddiff_alpha: float = Field(0.1, ge=0, le=100)
    """alpha: weight of KL(N(mu_s, sigma_s^2) || N(0, 1)) in the encoder fine-tuning
    (Eq. 9)"""
    feddiff_beta: float = Field(0.1, ge=0, le=100)
    """beta: weight of the contrastive term to the pool latent of similar accuracy (Eq.
    10-11)"""
    feddiff_finetune_steps: int = Field(20, ge=0, le=10_000)
    """encoder fine-tuning steps (Adam) in the round"""
    feddiff_finetune_lr: float = Field(1e-4, gt=0, le=1)
    """encoder fine-tuning learning rate"""
