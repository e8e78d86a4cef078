from ..card import MethodCard
from .server_feddeo import FedDeo

CARD = MethodCard(
    paper="Yang et al., FedDEO, ACM MM 2024 (arXiv 2407.19953)",
    paper_url="https://arxiv.org/abs/2407.19953",
    code="MingzhaoYang/FedDEO",
    family="feature-based",
    uploads="one learned description per class (fp16, the generator's "
    "conditioning shape)",
    privacy="features",
    summary="samples each description with the class prompt as a second guidance "
    "term, trains the global classifier on the union",
)

__all__ = ["CARD", "FedDeo"]
