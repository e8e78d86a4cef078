from ..card import MethodCard
from .server_dense import Dense

CARD = MethodCard(
    paper="Zhang et al., DENSE, NeurIPS 2022 (arXiv 2112.12371)",
    paper_url="https://arxiv.org/abs/2112.12371",
    code="zj-jayzhang/DENSE",
    family="model-based",
    uploads="the client's classifier, trained once from the shared initial weights",
    privacy="weights",
    summary="distils the clients' ensemble into the global model through a "
    "data-free generator (no diffusion model)",
)

__all__ = ["CARD", "Dense"]
