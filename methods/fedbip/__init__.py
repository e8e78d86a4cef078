from ..card import MethodCard
from .server_fedbip import FedBiP

CARD = MethodCard(
    paper="Chen et al., FedBiP, CVPR 2025 (arXiv 2410.04810)",
    paper_url="https://arxiv.org/abs/2410.04810",
    code="HaokunChen245/FedBiP",
    family="diffusion-model FL",
    uploads="noised generator-space latents of up to fedbip-instances-per-class "
    "images per class (fp16) and fitted concept tokens: one domain token, one "
    "token per class (fp16)",
    privacy="pixels",
    summary="denoises each client's noised latents (mixed pairwise for more "
    "images) on prompts with its domain and class tokens, trains the global "
    "classifier on the result",
)

__all__ = ["CARD", "FedBiP"]
