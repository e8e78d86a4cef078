from ..card import MethodCard
from .server_fedavg import FedAvg

CARD = MethodCard(
    paper="McMahan et al., FedAvg, AISTATS 2017 (arXiv 1602.05629), in one round",
    paper_url="https://arxiv.org/abs/1602.05629",
    family="baseline",
    uploads="the client's classifier, trained once from the shared initial weights",
    privacy="weights",
    summary="averages the classifiers once, weighted by example counts (no share "
    "above `max-weight-share`)",
)

__all__ = ["CARD", "FedAvg"]
