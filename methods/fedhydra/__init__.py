from ..card import MethodCard
from .server_fedhydra import FedHydra

CARD = MethodCard(
    paper="Bai et al., FedHydra, KDD 2025 (arXiv 2410.21119)",
    paper_url="https://arxiv.org/abs/2410.21119",
    code="Jun-B0518/FedHydra",
    family="model-based",
    uploads="the client's classifier (its own architecture allowed), trained once, "
    "with per-class training counts and held-out record (examples, correct)",
    privacy="weights",
    summary="stratifies the client models per class by their held-out record and "
    "distils their stratified ensemble through DENSE's data-free generator",
)

__all__ = ["CARD", "FedHydra"]
