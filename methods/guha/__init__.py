from ..card import MethodCard
from .server_guha import Guha

CARD = MethodCard(
    paper="Guha, Talwalkar & Smith, One-Shot Federated Learning, 2019 "
    "(arXiv 1902.11175)",
    paper_url="https://arxiv.org/abs/1902.11175",
    family="model-based",
    uploads="the client's classifier, trained once from the shared initial weights, "
    "and its accuracy on the client's held-out split",
    privacy="weights",
    summary="keeps the best client models as an ensemble (CV selection) and distils "
    "it into the global model on unlabelled public images",
)

__all__ = ["CARD", "Guha"]
