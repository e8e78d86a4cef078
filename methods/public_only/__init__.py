from ..card import MethodCard
from .server_public_only import PublicOnly

CARD = MethodCard(
    paper="the floor: the server's public data alone (no paper)",
    paper_url="",
    family="baseline",
    uploads="nothing but the client's class names and example count (the envelope)",
    privacy="statistics",
    summary="trains the global classifier on the server's labelled public images: "
    "what the server knows without any client",
)

__all__ = ["CARD", "PublicOnly"]
