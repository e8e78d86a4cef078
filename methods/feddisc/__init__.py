from ..card import MethodCard
from .server_feddisc import FedDisc

CARD = MethodCard(
    paper="Yang et al., FedDISC, AAAI 2024 (arXiv 2305.04063)",
    paper_url="https://arxiv.org/abs/2305.04063",
    code="MingzhaoYang/FedDISC",
    family="feature-based",
    uploads="k-means centres per class of the client's CLIP image embeddings (fp16)",
    privacy="features",
    summary="maps the centres into the generator's text-embedding space, samples "
    "each with two guidance terms (centre, client mean), trains the classifier",
)

__all__ = ["CARD", "FedDisc"]
