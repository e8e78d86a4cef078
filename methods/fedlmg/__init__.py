from ..card import MethodCard
from .server_fedlmg import FedLmg

CARD = MethodCard(
    paper="Yang et al., FedLMG, ICML 2025 (arXiv 2311.08870)",
    paper_url="https://arxiv.org/abs/2311.08870",
    code="MingzhaoYang/FedCADO",
    family="model-based",
    uploads="the client's trained classifier, in its own architecture, and its "
    "class counts",
    privacy="weights",
    summary="steers the diffusion model with each client's classifier (gradient "
    "of its loss on the predicted clean image), trains the global classifier",
)

__all__ = ["CARD", "FedLmg"]
