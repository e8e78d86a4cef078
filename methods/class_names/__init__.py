from ..card import MethodCard
from .server_class_names import ClassNames

CARD = MethodCard(
    paper="Zhang et al., FGL, 2023 (arXiv 2306.16064)",
    paper_url="https://arxiv.org/abs/2306.16064",
    family="baseline",
    uploads="nothing but the client's class names and example count (the envelope)",
    privacy="statistics",
    summary="synthesizes from the class prompts alone and trains the global "
    "classifier: what the generator knows without the clients",
)

__all__ = ["CARD", "ClassNames"]
