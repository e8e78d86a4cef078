from ..card import MethodCard
from .server_fedld import FedLD

CARD = MethodCard(
    paper="FedLD, one-shot FL with local distribution-conditioned image synthesis, "
    "ICLR 2026 submission (OpenReview KPjHoZdEJe)",
    paper_url="https://openreview.net/forum?id=KPjHoZdEJe",
    family="diffusion-model FL",
    uploads="a diagonal Gaussian mixture per class of the images' generator-space "
    "latents (fp16 means and variances, component counts); a mean decodes to the "
    "average of its images",
    privacy="pixels",
    summary="draws initial latents from each client's class mixtures and denoises "
    "them class-prompted (SDEdit), trains the global classifier on the result",
)

__all__ = ["CARD", "FedLD"]
