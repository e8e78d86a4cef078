from ..card import MethodCard
from .server_oscar import Oscar

CARD = MethodCard(
    paper="Zaland et al., OSCAR, 2025 (arXiv 2502.08488)",
    paper_url="https://arxiv.org/abs/2502.08488",
    code="obaidullahzaland/oscar",
    family="feature-based",
    uploads="caption-embedding prototypes per class (fp16 CLIP text vectors) and "
    "their counts",
    privacy="features",
    summary="samples images per (client, class) from the uploaded caption "
    "embeddings with classifier-free guidance, trains the global classifier on them",
)

__all__ = ["CARD", "Oscar"]
