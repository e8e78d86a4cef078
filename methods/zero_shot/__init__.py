from ..card import MethodCard
from .server_zero_shot import ZeroShot

CARD = MethodCard(
    paper="CLIP zero-shot (Radford et al., ICML 2021, arXiv 2103.00020); the floor",
    paper_url="https://arxiv.org/abs/2103.00020",
    family="baseline",
    uploads="nothing but the client's class names and example count (the envelope)",
    privacy="statistics",
    summary="classifies by the class prompt embedding nearest to the image's, with "
    "the stack's own CLIP towers: what its encoders know without clients or training",
)

__all__ = ["CARD", "ZeroShot"]
