from ..card import MethodCard
from .server_feddiff import FedDiff

CARD = MethodCard(
    paper='FedDiff, "Beyond Aggregation: Efficient Federated Model Consolidation '
    'with Heterogeneity-Adaptive Weights Diffusion"; on p-diff (Wang et al. 2024)',
    paper_url="",
    code="NUS-HPC-AI-Lab/Neural-Network-Diffusion",
    family="model-based",
    uploads="the client's classifier, fine-tuned from the public pool's best model",
    privacy="weights",
    summary="superposes the clients' latents of a parameter subset and denoises "
    "them with a latent DDPM trained on a public weight pool",
)

__all__ = ["CARD", "FedDiff"]
