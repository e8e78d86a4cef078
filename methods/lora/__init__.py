from ..card import MethodCard
from .server_lora import Lora

CARD = MethodCard(
    paper="FedDDPM (arXiv 2503.06426), FedIT, FLoRA (arXiv 2409.05976)",
    paper_url="https://arxiv.org/abs/2503.06426",
    family="diffusion-model FL",
    uploads="a LoRA adapter of the shared generator's UNet (fp16) and per-class "
    "caption embeddings",
    privacy="weights",
    summary="merges the adapters once (`lora-merge`), pushes the merged adapter "
    "back and trains the global classifier on its samples",
)

__all__ = ["CARD", "Lora"]
