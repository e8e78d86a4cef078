from ..card import MethodCard
from .server_fgl_instance import FglInstance

CARD = MethodCard(
    paper="Zhang, Qi & Zhao, Federated Generative Learning with Foundation Models, "
    "2023 (arXiv 2306.16064), instance-level prompts",
    paper_url="https://arxiv.org/abs/2306.16064",
    code="zj-jayzhang/Federated_Generative_Learning",
    family="feature-based",
    uploads="one encoded caption per training image (fp16 CLIP text vectors) and "
    "its class",
    privacy="features",
    summary="synthesizes one image per uploaded caption embedding (bounded by "
    "`synth-budget`), trains the global classifier on them",
)

__all__ = ["CARD", "FglInstance"]
