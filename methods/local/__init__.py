from ..card import MethodCard
from .server_local import Local

CARD = MethodCard(
    paper="no federation (the reference)",
    paper_url="",
    family="baseline",
    uploads="the accuracy of the client's own model (metrics only)",
    privacy="statistics",
    summary="each client trains and evaluates on its own data only: whether "
    "collaboration helped at all",
)

__all__ = ["CARD", "Local"]
