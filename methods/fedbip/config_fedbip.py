"""FedBiP's own keys."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class FedBiPConfig(KeysModel):
    """FedBiP's own keys (``fedbip-*``): the instance level (how many latents a
    client uploads, how far they are noised), the client's concept optimisation
    and the server's diversity (interpolation, concept noise)."""

    # instance level
    fedbip_instances_per_class: int = Field(16, ge=1, le=4096)
    """noised latents a client uploads per class, drawn from its images (the code: the
    16 shots per class it holds)"""
    fedbip_strength: float = Field(1.0, gt=0, le=1)
    """fraction of the sampling schedule run from the uploaded latents: the client
    noises them to the step where it starts; 1 is the schedule's first step (the
    code), lower keeps more of each image"""
    # concept level: a domain token and one token per class, on the client
    fedbip_concept_steps: int = Field(30, ge=1, le=100_000)
    """the client's Adam steps on its domain and class tokens (the code: 50 epochs over
    its 16 shots per class)"""
    fedbip_concept_batch_size: int = Field(8, ge=1, le=4096)
    """images per concept step on the client (code: 8)"""
    fedbip_concept_lr: float = Field(0.001, gt=0, le=10)
    """Adam's learning rate on the concept tokens (the code: 0.1 on Stable Diffusion's
    text-encoder outputs; token embeddings are ~30x smaller)"""
    # server synthesis
    fedbip_interpolate: bool = Field(True)
    """images beyond one per uploaded latent start from a mix of two latents of the
    (client, class) (the code's interpolation); false repeats them"""
    fedbip_concept_noise: float = Field(0.1, ge=0, le=10)
    """Gaussian noise on the domain token per synthetic image, times the token's RMS
    (the code: N(0, 0.1^2) on the domain concept)"""
