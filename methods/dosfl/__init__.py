from ..card import MethodCard
from .server_dosfl import Dosfl

CARD = MethodCard(
    paper="Zhou, Pu, Ma, Li & Wu, Distilled One-Shot Federated Learning, 2020 "
    "(arXiv 2009.07999)",
    paper_url="https://arxiv.org/abs/2009.07999",
    family="data-based",
    uploads="a few distilled images per class held (fp32), their soft labels and "
    "learned step sizes, distilled for the shared initial weights",
    privacy="pixels",
    summary="trains the global classifier from the shared initial weights on the "
    "union of the distilled sets (or replays the clients' distilled steps, the "
    "paper's server)",
    code="ssnl/dataset-distillation",
)

__all__ = ["CARD", "Dosfl"]
